"""``train_net.py`` with the engine tests' toy model and tiny datasets registered.

Usage: ``python tests/engine/toy_train_net.py <train_net.py arguments>``; the environment
variable ``TOY_DATASETS`` lists ``name=directory`` pairs (comma-separated) of tiny COCO datasets
to write (if absent) and register before ``train_net.py`` runs.
"""

import os
import sys

import engine_toy  # noqa: F401  (registers EngineToyModel)

sys.path.insert(0, str(engine_toy.REPO_ROOT))
import train_net  # noqa: E402

# at module level, so that processes started by launch() (which import this file) register too
for item in filter(None, os.environ.get("TOY_DATASETS", "").split(",")):
    name, root = item.split("=", 1)
    engine_toy.register_tiny_coco(name, root)

if __name__ == "__main__":
    train_net.invoke_main()
