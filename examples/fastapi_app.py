"""Monitor your own model: a FastAPI app serving a torch MLP on tabular data, watched by layerwatch.

The model is not one of layerwatch's demo models: a 20-feature, 4-class MLP trained on
scikit-learn's ``make_classification`` data (``examples/tabular.py``: seeded, cached under
``./.layerwatch/examples``). The layerwatch part is five lines, marked ``# layerwatch``.

    layerwatch broker &  layerwatch worker &                  # or point LW_KAFKA_BOOTSTRAP at your Kafka
    python examples/fastapi_app.py reference                   # once per model version: the clean reference
    uvicorn fastapi_app:app --app-dir examples --port 8000
    curl -s localhost:8000/predict -H 'Content-Type: application/json' \\
         -d '{"inputs": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]}'

Environment: the usual ``LW_*`` settings (``LW_KAFKA_BOOTSTRAP``, ``LW_TOPIC_PREFIX``, Kafka
security), and ``EXAMPLE_MODEL_PATH`` for the weights file.
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from layerwatch import IdentityPolicy, Monitor, UnknownKey, load_settings, top1
from tabular import FEATURES, dataset, load_model

MODEL_ID, MODEL_VERSION = "tabular-mlp", "1"


class Predict(BaseModel):
    inputs: list[list[float]] = Field(min_length=1, max_length=1024)


model = load_model()
monitor = Monitor(model, MODEL_ID, MODEL_VERSION)  # layerwatch: Kafka address from LW_KAFKA_BOOTSTRAP
# who is asking: an API key, else X-Client-Id only when LW_TRUST_CLIENT_ID_HEADER says a proxy of yours sets it,
# else the peer address, so a prober cannot rotate its identity
identity = IdentityPolicy(trust_header=load_settings().trust_client_id_header)


@asynccontextmanager
async def lifespan(_app: FastAPI):
    yield
    monitor.close()  # layerwatch: flush what is queued on shutdown


app = FastAPI(title="tabular-mlp", lifespan=lifespan)


@app.post("/predict")
def predict(body: Predict, request: Request) -> dict:
    """Top-1 labels only (no scores to help an attacker); blocked clients get 403, throttled 429."""
    try:
        client_id = identity.client_id(request.headers, request.client.host if request.client else None)
    except UnknownKey as exc:
        raise HTTPException(401, detail=str(exc)) from None
    decision = monitor.decision(client_id)  # layerwatch: actions from lw.actions
    if decision != "allow":
        raise HTTPException(403 if decision == "block" else 429, detail=decision)
    x = torch.tensor(body.inputs, dtype=torch.float32)
    if x.ndim != 2 or x.shape[1] != FEATURES:
        raise HTTPException(422, detail=f"inputs must be rows of {FEATURES} numbers")
    with torch.inference_mode():
        logits = monitor(x, client_id=client_id)  # layerwatch: exactly model(x), published in the background
    return {"labels": top1(logits)}


@app.get("/health")
def health() -> dict:
    return {"status": "ok", "monitor": monitor.stats()}


def publish_reference() -> int:
    """Publish the validation split as this model version's clean reference (run once per version)."""
    x, y = dataset()["val"]
    return monitor.publish_reference(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=256))


if __name__ == "__main__":
    if sys.argv[1:] != ["reference"]:
        sys.exit("usage: python examples/fastapi_app.py reference   (serve with: uvicorn fastapi_app:app --app-dir examples)")
    print(f"published {publish_reference()} reference events for {MODEL_ID} v{MODEL_VERSION}")
    monitor.close()
