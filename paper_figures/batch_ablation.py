"""`python -m paper_figures.batch_ablation RUNS_DIR`: runs :mod:`sdebatch.figures.batch_ablation` (the code)."""
from sdebatch.figures.batch_ablation import main

if __name__ == "__main__":
    main()
