"""Data: the processed dataset layout (docs/DATA_LAYOUT.md) and what reads and writes it.

- :mod:`lotcrs_plugin.data.processed`: ``ProcessedDataset``, the CRSLab dataset class over a
  processed folder; ``dataset_class_for(name, folder)`` binds one to a folder for registration
  (imports crslab, through the compat patches).
- :mod:`lotcrs_plugin.data.processed_folder`: ``check_folder`` / ``validate_folder`` / ``scan``,
  reading and checking a processed folder without crslab.
- :mod:`lotcrs_plugin.data.synthetic`: the built-in ``synthetic`` dataset (generator,
  ``SyntheticConfig``, ``SyntheticDataset``); its generator needs only numpy.
- :mod:`lotcrs_plugin.data.importers`: real CRS data into the layout (``crslab import-data``).

Importing this package imports nothing else, so that ``crslab --help`` stays quick.
"""
