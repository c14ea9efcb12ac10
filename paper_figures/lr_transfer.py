"""`python -m paper_figures.lr_transfer RUNS_DIR`: runs :mod:`sdebatch.figures.lr_transfer` (the code)."""
from sdebatch.figures.lr_transfer import main

if __name__ == "__main__":
    main()
