"""spindiff: a spin-bath reading of self-attention, and attention-guided spherical diffusion.

Subpackages/modules:
    config      structured OmegaConf configs for every entry point
    models      model layer (Hugging Face ids, bundled SmolLM2, tiny random models)
    adapter     per-family access to per-head weights and hooks (GPT-2, Llama/GQA)
    runtime     device/dtype, seeds, run records
    tracking    Weights & Biases (offline unless a key is configured)
"""
__version__ = "0.1.0"
