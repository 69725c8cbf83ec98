"""The contract that the training job and the server share.

Three things live here and nowhere else:

* ``volume`` / ``adapter_files``: the adapters volume (layout, manifest, atomic publish, resolving
  ``name`` / ``name@vN``) and how adapter files are read and validated;
* ``base_model``: base-model resolution (alias | local folder | hub id), conversion and loading;
* ``chat_format``: messages -> token ids (and the training mask), so a prompt is the same ids at
  training time and at serving time.

This package imports neither ``train_job`` nor ``server``.
"""

__version__ = "0.1.0"
