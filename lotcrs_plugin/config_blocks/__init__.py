"""The config blocks of the LOT-CRS stages that both the models (lotcrs_plugin.model) and the
systems (lotcrs_plugin.system) read, kept apart from both so that neither imports the other for
its settings:

- ``lotcrs:`` -> :class:`~lotcrs_plugin.config_blocks.finetune.FinetuneConfig` (the pipeline and fine-tuning)
- ``lotcrs_pretrain:`` -> :class:`~lotcrs_plugin.config_blocks.pretrain.PretrainConfig` (DMP + CCA)
- ``rerank:`` -> :class:`~lotcrs_plugin.config_blocks.rerank.RerankConfig` (the kNN vote and the tail slots)
- ``retrieval:`` -> :class:`~lotcrs_plugin.config_blocks.retrieval.RetrievalConfig` (the memory store, fusion
  and the retrieval loss)

The other blocks live with the one module that reads them (``head:`` in lotcrs_plugin.model.heads,
``selection:`` in lotcrs_plugin.system.selection, ...); lotcrs_plugin.config.CONFIG_BLOCKS lists them all.
"""
