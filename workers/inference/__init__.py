"""Inference side of layerwatch: demo data and models, LayerTap, the publisher, the model server, traffic.

- :mod:`workers.inference.data`      the fixed digits split (``demo_split``)
- :mod:`workers.inference.models`    demo models (``load_demo_models``, ``DemoModel``, ``layer_names``)
- :mod:`workers.inference.tap`       ``LayerTap``: layer activations as (batch, dim) matrices
- :mod:`workers.inference.publisher` ``Publisher``: PredictionBatch records to Kafka (kafka-python)
- :mod:`workers.inference.defences`  preprocessing (bit depth, median blur), MC-dropout uncertainty
- :mod:`workers.inference.server`    ``ModelServer`` / ``run_server``: HTTP predictions (aiohttp)
- :mod:`workers.inference.traffic`   ``publish_reference`` and ``simulate``

Submodules are imported on use, so importing the package stays cheap.
"""
