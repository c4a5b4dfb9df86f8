"""Data, the synthetic generator, the training loop, metrics and calibration.

Read ``train.py`` first: ``train(cfg)`` tells the whole story, and each step
lives in a module of its own:

* ``config``: the typed config loaded from YAML;
* ``data`` (where patches come from, checked before training), ``dataset``
  (``PatchDataset``), ``transforms``, ``loaders`` (which patch when, seeded how);
* ``losses``, ``optim``, ``engine`` (``train_one_epoch``, ``evaluate``),
  ``state`` (the run folder and exact resume), ``seeding``, ``distributed``,
  ``calibration``;
* ``metrics`` (pure numpy), ``report`` and ``evaluate`` (``calcinosis evaluate``);
* ``synthetic``: the generator of labelled H&E / von Kossa / Alizarin red patches.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("calcinosis")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"
