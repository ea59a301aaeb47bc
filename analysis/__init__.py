"""Head analysis: the paper's Sections II-IV, its reference protocol, corrected protocols, the
context field, and the terms beyond the two-body one (``python -m analysis <command>``;
docs/analysis.md).

Modules: config (the ``analysis`` entry's config, registered on import), prompts (prompt sets,
candidate tokens), gaps (dL_theory / dL_actual under the paper, paper_fixed and in_situ protocols),
stats (per-head r, BH, permutation FWER, bootstrap, split-half, replication), ablation (targeted
and full-scan head ablation), temperature (order parameters vs T), landscape (Fig. 2 decision
plane), paths (first-order path decomposition), attention (attention recomputed from the adapter's
weights), attribution (AtP and the AtP* QK fix), interactions (head-pair interactions), compare
(predictors vs the exact effect), figures, report, pipeline (the stages), beyond / reproduce
(stages), cli.
"""
import analysis.config  # noqa: F401  (registers the "analysis" config entry)
from spindiff.lm.field import ContextFieldProvider, FieldOutput

from analysis.ablation import (LayerSuffixScanner, ScanResult, ablation_scan, ablation_table, mean_z_over,
                               scan_full_forward)
from analysis.attribution import SaturationFix, atp, qk_fix
from analysis.config import AnalysisConfig
from analysis.gaps import PROTOCOLS, GapTable, compute_gaps, paper_gap_table
from analysis.interactions import PairInteractions, joint_ablation, pair_interactions
from analysis.landscape import Landscape, decision_landscape
from analysis.paths import GradientTrace, PathTerms, gradient_trace, path_terms, qkv_split
from analysis.prompts import PromptFileError, PromptSet, PromptTokenError, from_triples, load_prompts, tokenize_set
from analysis.stats import HeadStats, bootstrap_r, head_regression, head_stats, pearson_many, permutation_maxabs
from analysis.temperature import TemperatureSweep, temperature_sweep

__all__ = [
    "AnalysisConfig", "ContextFieldProvider", "FieldOutput", "PROTOCOLS", "GapTable", "compute_gaps",
    "paper_gap_table", "PromptSet", "PromptFileError", "PromptTokenError", "load_prompts", "from_triples",
    "tokenize_set", "HeadStats", "head_stats", "head_regression", "pearson_many", "permutation_maxabs", "bootstrap_r",
    "LayerSuffixScanner", "ScanResult", "ablation_scan", "ablation_table", "mean_z_over", "scan_full_forward",
    "TemperatureSweep", "temperature_sweep", "Landscape", "decision_landscape", "GradientTrace", "PathTerms",
    "gradient_trace", "path_terms", "qkv_split", "atp", "qk_fix", "SaturationFix", "PairInteractions",
    "joint_ablation", "pair_interactions",
]
