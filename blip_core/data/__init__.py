"""Data: the toy-web generator, sample checks, WebDataset shards (dataset directories), transforms, loaders.

Import the submodules directly (``from blip_core.data.loader import make_loader``); this package keeps
its import light so the ingest stage does not pull in torch-heavy loader code it does not need.
"""
