"""``python -m denoiseg_core`` runs the ``denoiseg`` command line."""

from denoiseg_core.cli import main

if __name__ == "__main__":
    main()
