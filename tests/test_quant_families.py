"""`remoe pack --quantize` for every family remoe-engine loads: each tiny model's experts packed
int4 (groups of 32 input columns), served by `load(path, packed=OUT)`, give the logits and greedy
tokens of the same model with its experts set to the reference dequantization of those blobs.

Slow: every family builds, saves, packs and loads a model.
"""

from __future__ import annotations

import pytest
import torch

from remoe_engine.families import experts_interface_model_types, moe_blocks_or_raise
from remoe_engine.tiny_models import Unbuildable, build_tiny

pytestmark = pytest.mark.slow

SCHEME = "int4:g32"


@pytest.mark.parametrize("model_type", experts_interface_model_types())
def test_pack_quantize_serves_every_family(model_type, tmp_path):
    import remoe_engine
    from remoe_engine.families import learn_routing
    from remoe_engine.store import ExpertStore

    try:
        model = build_tiny(model_type)
    except Unbuildable as error:
        pytest.skip(f"not built: {error}")
    model.save_pretrained(tmp_path / "ckpt")
    try:  # `remoe families` lists these as refused, with the same reason
        store = ExpertStore.from_checkpoint(tmp_path / "ckpt")
        blocks = moe_blocks_or_raise(model)
        top_k = learn_routing(model).top_k
    except NotImplementedError as error:
        pytest.skip(f"refused: {str(error).splitlines()[0]}")
    out = store.pack(tmp_path / "q.remoe", progress=False, quantize=SCHEME)
    packed = ExpertStore.from_packed(out)
    assert packed.compressed.scheme == SCHEME and packed.blob_bytes < store.layout.slot_bytes
    with torch.no_grad():  # the reference: the same model, experts = the blobs dequantized
        for block in blocks:
            for e in range(packed.num_experts):
                for name, t in packed.expert_tensors(block.layer_idx, e, torch.float32).items():
                    getattr(block.experts, name)[e].copy_(t)
    loaded = remoe_engine.load(tmp_path / "ckpt", packed=out, dtype=torch.float32,
                               slots_per_layer=top_k, device="cpu")
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.float()
        got = loaded(input_ids=ids, use_cache=False).logits.float()
        assert (want - got).abs().max().item() <= 1e-5
        kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kwargs), loaded.generate(ids, **kwargs))
    assert loaded.remoe.stats()["misses"] > 0
