"""``python -m fastmlgan.train`` and ``torchrun -m fastmlgan.train``: the train command
(``fastmlgan.commands.train``)."""

from fastmlgan.commands.train import run_as_script

if __name__ == "__main__":
    run_as_script()
