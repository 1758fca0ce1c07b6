"""Small helpers every script uses, none of them about VoP: command-line options (cli.py), the project's error
types (errors.py), safe file writes (files.py), progress lines (progress.py) and the torch.distributed helpers
of torchrun runs (distributed.py). Skip on a first reading."""
