"""Statistics and figures of batch-size sweeps (read run folders, train nothing; needs matplotlib).

batch_ablation: final loss vs batch per update per rule, paired by seed, the knee; loss vs tokens.
lr_transfer: the optimum of loss vs lr per batch and rule, and how far it moves.
report: all of it for one sweep folder as PNG / PDF figures and a self-contained HTML page (``sdebatch report``).
"""
