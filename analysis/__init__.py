"""Head analysis: the paper's Sections II-IV, its reference protocol, corrected protocols, and the
context field (``python -m analysis <command>``; docs/analysis.md).

Modules: prompts (prompt sets, candidate tokens), gaps (dL_theory / dL_actual under the paper,
paper_fixed and in_situ protocols), stats (per-head r, BH, permutation FWER, bootstrap, split-half,
replication), ablation (targeted and full-scan head ablation), temperature (order parameters vs T),
landscape (Fig. 2 decision plane), figures, report, cli.
"""
from spindiff.lm.field import ContextFieldProvider, FieldOutput

from analysis.ablation import (LayerSuffixScanner, ScanResult, ablation_scan, ablation_table, mean_z_over,
                               scan_full_forward)
from analysis.gaps import PROTOCOLS, GapTable, compute_gaps, paper_gap_table
from analysis.landscape import Landscape, decision_landscape
from analysis.prompts import PromptFileError, PromptSet, PromptTokenError, from_triples, load_prompts, tokenize_set
from analysis.stats import HeadStats, bootstrap_r, head_regression, head_stats, pearson_many, permutation_maxabs
from analysis.temperature import TemperatureSweep, temperature_sweep

__all__ = [
    "ContextFieldProvider", "FieldOutput", "PROTOCOLS", "GapTable", "compute_gaps", "paper_gap_table", "PromptSet", "PromptFileError",
    "PromptTokenError", "load_prompts", "from_triples", "tokenize_set", "HeadStats", "head_stats", "head_regression",
    "pearson_many", "permutation_maxabs", "bootstrap_r", "LayerSuffixScanner", "ScanResult", "ablation_scan", "ablation_table",
    "mean_z_over", "scan_full_forward", "TemperatureSweep", "temperature_sweep", "Landscape", "decision_landscape",
]
