"""Token-by-token generation: the session, decoding, the sampler registry and one module per sampler.

==============  ==================================================================================
``spin``        reverse SDE on S^{d-1} per token (:mod:`spindiff.generation.spin`)
``ar``          the LM's own sampling (``model.generate``; :mod:`spindiff.generation.ar`)
``euclid_ddpm`` Gaussian DDPM in embedding space (:mod:`spindiff.generation.euclid_ddpm`)
``block``       K drafts verified by one LM forward, exact (:mod:`spindiff.generation.block`)
==============  ==================================================================================

Importing this package registers every sampler; :func:`build_sampler` picks one by name.
"""
from spindiff.generation.session import DIAG_KEYS, GenerationBatch, GenerationSession, SampleError
from spindiff.generation.decoding import decode_spins
from spindiff.generation.base import SAMPLERS, Sampler, StepSampler, build_sampler, find_checkpoint, get_sampler_class, register_sampler
from spindiff.generation import ar, block, euclid_ddpm, spin  # noqa: F401  (register the samplers)
from spindiff.generation.ar import ARSampler
from spindiff.generation.euclid_ddpm import EuclidDDPMSampler
from spindiff.generation.spin import SpinSampler

__all__ = ["DIAG_KEYS", "GenerationBatch", "GenerationSession", "SampleError", "decode_spins",
           "SAMPLERS", "Sampler", "StepSampler", "build_sampler", "find_checkpoint", "get_sampler_class",
           "register_sampler", "ARSampler", "EuclidDDPMSampler", "SpinSampler"]
