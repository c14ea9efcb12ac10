"""`python -m paper_figures.ramp RUNS_DIR`: runs :mod:`sdebatch.figures.ramp` (the code)."""
from sdebatch.figures.ramp import main

if __name__ == "__main__":
    main()
