"""`python -m paper_figures.batch_ablation RUNS_DIR`: the script of :mod:`sdebatch.figures.batch_ablation` (where the code lives)."""
from sdebatch.figures.batch_ablation import main

if __name__ == "__main__":
    main()
