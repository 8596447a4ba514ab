"""The adapter bank: mixed batches equal one adapter at a time; answers from routes."""

import pytest
import torch
from peft import LoraConfig

from adapterhub_local.base import load_base
from adapterhub_local.inference import answer, bank_for, mean_pool
from adapterhub_local.methods import get_method
from adapterhub_local.router import FEATURES, Route
from conftest import refuse

TEXTS = ["the red cat", "a very happy dog seen today", "blue", "sad bird near here and the nest",
         "kitten", "the the the the crimson navy azure glad"]


@pytest.fixture(scope="module")
def bank(tiny_base):
    """Two adapters with random (non-zero) LoRA weights and their own heads, in the process's
    bank for the tiny base."""
    bank = bank_for(load_base(tiny_base))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"],
                        init_lora_weights=False)
    # ahl_b scales its update otherwise: the stacks must scale each adapter's B by its own
    other_scale = LoraConfig(r=4, lora_alpha=12, target_modules=["query", "value", "output.dense"],
                             init_lora_weights=False)
    top_half = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"],
                          init_lora_weights=False, layers_to_transform=[1], layers_pattern="layer")
    for seed, name, labels, cfg in ((1, "ahl_a", ["x", "y"], config),
                                    (2, "ahl_b", ["p", "q", "r"], other_scale),
                                    (3, "ahl_top", ["s", "t"], top_half)):
        torch.manual_seed(seed)
        bank.add_adapter(name, cfg, labels, get_method("lora"))
    bank.model("ahl_a").eval()
    yield bank
    for name in ("ahl_a", "ahl_b", "ahl_top"):
        bank.remove_adapter(name)


def one_at_a_time(bank, texts, adapters):
    return [bank.probabilities([t], [a])[0] for t, a in zip(texts, adapters)]


def test_mixed_batch_equals_one_adapter_at_a_time(bank):
    adapters = ["ahl_a", "ahl_b"] * 3
    mixed = bank.probabilities(TEXTS, adapters)
    for got, want in zip(mixed, one_at_a_time(bank, TEXTS, adapters)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and the adapters really differ, so the check above could fail
    assert not torch.allclose(bank.probabilities(TEXTS[:1], ["ahl_a"])[0][:2],
                              bank.probabilities(TEXTS[:1], ["ahl_b"])[0][:2])


def test_methods_that_ignore_adapter_names_run_grouped(bank):
    adapters = ["ahl_a", "ahl_b", "ahl_b", "ahl_a", "ahl_b", "ahl_a"]
    want = bank.probabilities(TEXTS, adapters)
    bank.mixed_batch["ahl_b"] = False  # as for prompt tuning, IA3, LoHa...: grouped per adapter
    try:
        got = bank.probabilities(TEXTS, adapters)
    finally:
        bank.mixed_batch["ahl_b"] = True
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_router_features_ignore_loaded_adapters(tiny_base, bank):
    from transformers import AutoModel

    bare = AutoModel.from_pretrained(tiny_base).eval()  # a second copy, never wrapped by peft
    batch = bank.base.pad(bank.base.tokenize(TEXTS, 128))
    with torch.no_grad():
        states = bare(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].unsqueeze(-1).float()
    middle = states[1]  # the tiny base has 2 blocks: the states after the first
    want = torch.nn.functional.normalize((middle * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(bank.features(TEXTS), want, rtol=1e-4, atol=1e-5)


def bank_of_depth(tiny_base: str, folder, blocks: int):
    """The bank of the tiny base's architecture with `blocks` blocks, random, saved in folder."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_base)
    config.num_hidden_layers = blocks
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(folder)
    return bank_for(load_base(str(folder)))


def test_bottom_half_features_pool_each_block_side_by_side(tiny_base, tmp_path):
    """What the router reads by default: blocks across the bottom half, each mean-pooled to
    unit length, concatenated; "middle" (older stores) is the middle block's alone."""
    six = bank_of_depth(tiny_base, tmp_path, 6)  # middle = block 2: the bottom half is three blocks
    batch = six.base.pad(six.base.tokenize(TEXTS, 128))
    with torch.no_grad():
        states = six.base.model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = [torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1) for h in states]
    torch.testing.assert_close(six.features(TEXTS), torch.cat(pooled[1:4], 1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(six.features(TEXTS, features="middle"), pooled[3], rtol=1e-4, atol=1e-5)
    features, kept = six.encode(TEXTS)
    assert features.shape == (len(TEXTS), 3 * six.base.hidden_size)
    torch.testing.assert_close(kept[0], states[3][0, : len(kept[0])])
    # However deep the base, three blocks: the statistics grow with the square of the width.
    assert FEATURES["bottom_half"](14) == [0, 7, 14] and FEATURES["bottom_half"](0) == [0]


def test_the_bottom_half_runs_packed_as_the_padded_forward_computes_it(bank, monkeypatch):
    """A BERT base's bottom half runs its texts packed (no pads in the linear layers), through
    adapters wrapping its blocks (ahl_a adapts every block; the bare context skips them), and
    gives what transformers' padded forward gives; a base in training mode is padded."""
    from adapterhub_local import packing

    ids = bank.base.tokenize(TEXTS, 128)
    with bank.bare():
        padded = bank.base.states_at([0], bank.base.pad(ids))[0]
    monkeypatch.setattr(type(bank.base), "states_at", refuse)  # the padded forward
    features, states = bank.encode(TEXTS, features="middle")
    mask = bank.base.pad(ids)["attention_mask"].unsqueeze(-1)
    want = torch.nn.functional.normalize((padded * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(features, want, rtol=1e-5, atol=1e-6)
    for k, state in enumerate(states):
        torch.testing.assert_close(state, padded[k, : len(ids[k])], rtol=1e-5, atol=1e-6)
    assert len({len(x) for x in ids}) > 2  # texts of several lengths: there were pads
    blocks = bank.base.layers
    bank.base.model.train()
    try:
        assert not packing.packable(bank.base.model, blocks)  # dropout: padded
    finally:
        bank.base.model.eval()
    # A hook on a module whose forward the packed block skips: padded, so that it runs
    hook = blocks[1].attention.output.register_forward_hook(lambda module, args, out: out)
    try:
        assert not packing.packable(bank.base.model, blocks)
    finally:
        hook.remove()
    assert packing.packable(bank.base.model, blocks)


def test_a_packing_pads_and_pools_each_texts_own_tokens():
    from adapterhub_local.packing import Packing

    ids = [[5, 6, 7], [8], [9, 10]]
    packing = Packing.of(ids, "cpu")
    tokens = torch.arange(12.0).view(6, 2)
    grid = packing.pad(tokens)
    assert grid.shape == (3, 3, 2) and grid[1, 1:].abs().sum() == 0  # the short text's pads
    torch.testing.assert_close(packing.unpad(grid), tokens)
    torch.testing.assert_close(packing.mean(tokens), torch.stack(
        [tokens[:3].mean(0), tokens[3], tokens[4:].mean(0)]))
    assert [len(x) for x in packing.split(tokens)] == [3, 1, 2]
    assert packing.positions.tolist() == [0, 1, 2, 0, 0, 1]


def test_a_one_block_base_reads_and_answers_from_its_only_block(tiny_base, tmp_path):
    """A one-block base has no bottom half (middle is -1): the router reads its only block's
    states (as layers[-1]), and adapters never go on from them but run the whole pass."""
    one = bank_of_depth(tiny_base, tmp_path, 1)
    batch = one.base.pad(one.base.tokenize(TEXTS, 128))
    with torch.no_grad():
        last = one.base.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((last * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(one.features(TEXTS), torch.cat([pooled, pooled], 1),
                               rtol=1e-4, atol=1e-5)  # bottom_half: blocks -1 and 0, one block
    torch.manual_seed(1)
    one.add_adapter("ahl_one", LoraConfig(r=4, target_modules=["query"], init_lora_weights=False,
                                          layers_to_transform=[0], layers_pattern="layer"),
                    ["x", "y"], get_method("lora"))
    _, states = one.encode(TEXTS)
    assert not one.resumes("ahl_one")
    model = one.evaluating("ahl_one")
    with torch.no_grad():
        logits = one.heads["ahl_one"](mean_pool(model(**batch).last_hidden_state, batch))
    for got, want in zip(one.probabilities(TEXTS, ["ahl_one"] * len(TEXTS), states=states),
                         logits.softmax(-1)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_default_lora_group_wraps_the_bank_base_itself(bank):
    """One method in use costs one base in memory: LoRA wraps the bank's base in place."""
    assert bank.model("ahl_a").get_base_model() is bank.base.model
    copied = bank.bare_copy()
    assert copied is not bank.base.model
    assert not any("lora_" in name for name, _ in copied.named_modules())


def test_very_long_text_is_truncated_not_refused(bank):
    long = " ".join(["cat"] * 5000)
    assert bank.probabilities([long], ["ahl_a"], max_length=32)[0].shape == (2,)


def test_answer_mixes_tasks_that_share_a_label_set():
    labels = {"chat": ["en", "es"], "fortune": ["en", "es"], "topic": ["a", "b", "c"]}
    probs = {"chat": torch.tensor([0.4, 0.6]), "fortune": torch.tensor([0.9, 0.1]),
             "topic": torch.tensor([0.7, 0.2, 0.1])}
    mixed = answer(Route(["chat", "fortune"], [0.6, 0.4], 0.6), probs, labels)
    # 0.6 * 0.4 + 0.4 * 0.9 = 0.60 for "en" beats 0.6 * 0.6 + 0.4 * 0.1 = 0.40 for "es"
    assert mixed["label"] == "en" and mixed["tasks"] == ["chat", "fortune"]
    assert mixed["score"] == pytest.approx(0.6 * 0.60)
    distinct = answer(Route(["chat", "topic"], [0.55, 0.45], 0.55), probs, labels)
    # 0.55 * 0.6 = 0.33 for chat's "es" vs 0.45 * 0.7 = 0.315 for topic's "a"
    assert (distinct["task"], distinct["label"]) == ("chat", "es")
    assert answer(Route([], [], 0.0, "empty text"), probs, labels)["label"] is None


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_going_on_from_the_routers_states_equals_a_full_pass(bank, packed, monkeypatch):
    """Adapters that leave the bottom half bare reuse the router's pass through it; packed
    (packing.py) or padded (other bases, GPUs), the answers are the same."""
    from adapterhub_local import packing

    assert bank.resumes("ahl_top") and not bank.resumes("ahl_a")
    adapters = ["ahl_top", "ahl_a", "ahl_top", "ahl_b", "ahl_top", "ahl_top"]
    _, states = bank.encode(TEXTS)
    other = bank.probabilities(TEXTS, adapters, states=states)
    monkeypatch.setattr(packing, "packable", lambda *args: packed)
    if packed:  # neither half pads its texts
        monkeypatch.setattr(type(bank.base), "pad", refuse)
    resumed = bank.probabilities(TEXTS, adapters, states=states)
    full = bank.probabilities(TEXTS, adapters)
    for got, want, default in zip(resumed, full, other):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, default, rtol=1e-5, atol=1e-6)
    assert len(list(bank.base.layers)) == 2 and all(  # the blocks are back after resuming
        type(block).__name__ == "BertLayer" for block in bank.base.layers)


def test_a_settled_composed_answer_is_the_one_any_other_adapter_would_give():
    """evaluation.settled skips the other routed adapters only where their outputs cannot
    change whether the composed answer is right: checked against answer() with random others."""
    from adapterhub_local.evaluation import settled

    labels = {"chat": ["en", "es"], "fortune": ["en", "es"], "topic": ["a", "b", "c"],
              "mood": ["up", "down"]}
    gen = torch.Generator().manual_seed(0)
    seen = {True: 0, False: 0, "with a label-set partner": 0}
    for _ in range(1000):
        tasks = [list(labels)[int(i)] for i in torch.randperm(4, generator=gen)[:2]]
        weights = torch.rand(2, generator=gen).tolist()
        weights = [w / sum(weights) for w in weights]
        route = Route(tasks, weights, max(weights))
        task = list(labels)[int(torch.randint(4, (1,), generator=gen))]
        own = (3 * torch.randn(len(labels[task]), generator=gen)).softmax(-1)  # often sure
        truth = int(torch.randint(len(labels[task]), (1,), generator=gen))
        if not settled(route, task, own, labels):
            seen[False] += 1
            continue
        seen[True] += 1
        seen["with a label-set partner"] += task in tasks and len({tuple(labels[t]) for t in tasks}) == 1
        expected = task in tasks and int(own.argmax()) == truth
        for _ in range(5):  # whatever the other adapters say
            probs = {t: torch.rand(len(labels[t]), generator=gen).softmax(-1) for t in tasks}
            probs[task] = own
            result = answer(route, probs, labels)
            assert (result["label"] == labels[task][truth] and task in result["tasks"]) == expected
    assert min(seen.values()) > 20, seen  # every branch was exercised


def test_gathered_mixed_batch_equals_peft_loop(bank, monkeypatch):
    """lora_batch's two batched products per layer give what peft's per-adapter loop gives,
    "__base__" rows (no adapter) included, whether the rows are named by peft's adapter_names
    or by lora_batch.rows."""
    from peft.tuners.lora.layer import Linear

    from adapterhub_local import lora_batch

    model = bank.model("ahl_a")
    model.eval()
    batch = bank.base.pad(bank.base.tokenize(TEXTS, 32))
    names = ["ahl_a", "ahl_b", "__base__", "ahl_b", "ahl_a", "ahl_a"]
    layers = [m for m in model.modules() if type(m) is Linear]
    assert layers and all("forward" in vars(m) for m in layers) and lora_batch.covers(model)
    fallbacks = []
    peft_loop = Linear._mixed_batch_forward
    lora = [p for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad]

    def with_grads(forward):
        """The forward's output and its LoRA weights' gradients (of the output's square sum),
        the weights trainable for it: autograd through the stacks and gathers, as through
        peft's loop."""
        for p in lora:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                out = forward()
                out.square().sum().backward()
            return out.detach(), [p.grad for p in lora]
        finally:
            for p in lora:
                p.requires_grad_(False)
                p.grad = None

    with monkeypatch.context() as patch:  # counts the layers that fall back to peft's loop
        patch.setattr(Linear, "_mixed_batch_forward", lambda *a, **k: fallbacks.append(1)
                      or peft_loop(*a, **k))
        with torch.inference_mode():
            gathered = model(**batch, adapter_names=names).last_hidden_state
            with lora_batch.rows(model, names):
                by_rows = model(**batch).last_hidden_state
            with lora_batch.rows(model, ["ahl_b"] * len(names)):  # one adapter: its own weights
                one = model(**batch).last_hidden_state
            with lora_batch.frozen(["ahl_a", "ahl_b"]):  # stacked once, then reused
                stacked = [model(**batch, adapter_names=names).last_hidden_state for _ in range(2)]
            with lora_batch.frozen(["ahl_a"]):  # a batch beyond the scope stacks its own
                stacked.append(model(**batch, adapter_names=names).last_hidden_state)
            with bank.bare():  # lora_batch's bare rows, and peft's own way
                bare = model(**batch).last_hidden_state
            with model.disable_adapter():
                disabled = model(**batch).last_hidden_state
        graded, grads = with_grads(lambda: model(**batch, adapter_names=names).last_hidden_state)
    assert fallbacks == []
    with lora_batch.uninstalled(model):  # peft's own loop
        with torch.inference_mode():
            looped = model(**batch, adapter_names=names).last_hidden_state
            one_looped = model(**batch, adapter_names=["ahl_b"] * len(names)).last_hidden_state
        looped_graded, looped_grads = with_grads(
            lambda: model(**batch, adapter_names=names).last_hidden_state)
    assert sum(g is not None for g in grads) > 0
    assert [g is None for g in grads] == [g is None for g in looped_grads]
    for mine, theirs in zip(grads, looped_grads):
        if mine is not None:
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(by_rows, gathered, rtol=0, atol=0)
    for again in stacked:
        torch.testing.assert_close(again, gathered, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bare, disabled, rtol=0, atol=0)
    assert not torch.allclose(bare, gathered)  # the adapters do change the states
    torch.testing.assert_close(gathered, looped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graded, looped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(looped_graded, looped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, one_looped, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(one, gathered)


def test_rows_ordered_by_adapter_run_as_slices_like_pefts_loop(bank, monkeypatch):
    """A batch whose rows come ordered by adapter (as probabilities orders them) runs each
    adapter's products on its slice of the batch, nothing gathered, with peft's loop's result;
    rows out of order, or more runs than MAX_RUNS, take the batched products."""
    from adapterhub_local import lora_batch

    texts = TEXTS * 2
    names = ["__base__", "ahl_a", "ahl_a", "ahl_a", "ahl_b", "ahl_b"] * 2
    ordered = sorted(range(len(names)), key=names.__getitem__)
    names, texts = [names[i] for i in ordered], [texts[i] for i in ordered]
    assert lora_batch.runs_of(names) == [("__base__", 0, 2), ("ahl_a", 2, 8), ("ahl_b", 8, 12)]
    assert lora_batch.runs_of(["ahl_a", "ahl_b", "ahl_a"]) is None
    # A layer slices up to max_runs runs: 16 on the CPU; on a GPU, bound by kernel launches,
    # three runs gather already (meta: a device other than the CPU)
    assert lora_batch.max_runs(torch.empty(1)) == lora_batch.MAX_RUNS
    assert lora_batch.max_runs(torch.empty(1, device="meta")) == lora_batch.DEVICE_MAX_RUNS < 3
    model = bank.model("ahl_a")
    model.eval()
    batch = bank.base.pad(bank.base.tokenize(texts, 32))
    with torch.inference_mode():
        with lora_batch.frozen(["ahl_a", "ahl_b"]), lora_batch.rows(model, names):
            sliced = model(**batch).last_hidden_state
        with lora_batch.uninstalled(model):  # peft's own loop
            looped = model(**batch, adapter_names=names).last_hidden_state
        # More runs than the layer slices: the batched products, no product pair per run
        monkeypatch.setattr(lora_batch, "MAX_RUNS", 2)
        monkeypatch.setattr(lora_batch, "add_product_", refuse)
        with lora_batch.frozen(["ahl_a", "ahl_b"]), lora_batch.rows(model, names):
            gathered = model(**batch).last_hidden_state
    torch.testing.assert_close(sliced, looped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gathered, looped, rtol=1e-5, atol=1e-5)


def test_packed_rows_through_many_adapters_give_pefts_padded_loop(bank, monkeypatch):
    """A packed forward (packing.py) sends each text's tokens through its row's adapter: rows
    ordered by adapter take a product pair per adapter's slice of tokens; rows out of order go
    to peft's loop with each token a row. Each gives peft's own padded loop's states."""
    from peft.tuners.lora.layer import Linear

    from adapterhub_local import lora_batch, packing

    torch.manual_seed(5)  # rank 8 beside the others' 4: a packed slice takes any rank
    bank.add_adapter("ahl_r8", LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"],
                                          init_lora_weights=False), ["u", "v"], get_method("lora"))
    try:
        model = bank.evaluating("ahl_a")
        bare = model.get_base_model()
        blocks = bare.get_submodule(bank.base.layers_name)
        texts = TEXTS * 3
        names = ["__base__", "ahl_a", "ahl_b", "ahl_top", "ahl_a", "ahl_b"] * 2 + ["ahl_r8"] * 6
        ordered = sorted(range(len(names)), key=names.__getitem__)
        peft_loop, fallbacks = Linear._mixed_batch_forward, []
        monkeypatch.setattr(Linear, "_mixed_batch_forward", lambda *a, **k: fallbacks.append(1)
                            or peft_loop(*a, **k))
        accumulates = lora_batch.can_accumulate
        one_rank = sorted(range(12), key=names.__getitem__)
        cases = [(one_rank, True), (ordered, True), (ordered, False), (list(range(12)), True)]
        for rows, by_addmm in cases:
            # not by addmm_: the update added as a tensor, as to a base whose dtype is not the
            # adapters'
            monkeypatch.setattr(lora_batch, "can_accumulate", accumulates if by_addmm
                                else lambda *args: False)
            row_names, ids = [names[i] for i in rows], bank.base.tokenize([texts[i] for i in rows], 32)
            packed = packing.Packing.of(ids, "cpu")
            fallbacks.clear()
            with torch.inference_mode():
                with lora_batch.frozen(set(names)), lora_batch.rows(model, row_names,
                                                                    packed.lengths.tolist()):
                    got = packing.last_states(bare, blocks, ids, packed)
                used_peft = bool(fallbacks)
                with lora_batch.uninstalled(model):
                    want = model(**bank.base.pad(ids), adapter_names=row_names).last_hidden_state
            assert used_peft == (rows == cases[-1][0])
            torch.testing.assert_close(got, packed.unpad(want), rtol=1e-5, atol=1e-5)
    finally:
        bank.remove_adapter("ahl_r8")
    with torch.inference_mode(), bank.bare():
        assert not torch.allclose(got, packed.unpad(bare(**bank.base.pad(ids)).last_hidden_state))


def test_a_packed_batch_with_a_lora_bias_goes_to_pefts_loop(bank, monkeypatch):
    """An adapter that is not plain LoRA (here a LoRA bias, which the slice loop's product pair
    would leave out) sends its packed batch to peft's loop, and the states are still peft's."""
    from peft.tuners.lora.layer import Linear

    from adapterhub_local import lora_batch, packing

    torch.manual_seed(6)
    bank.add_adapter("ahl_bias", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            init_lora_weights=False, lora_bias=True),
                     ["u", "v"], get_method("lora"))
    try:
        model = bank.evaluating("ahl_a")
        biases = [m.lora_B["ahl_bias"].bias for m in model.modules()
                  if isinstance(m, Linear) and "ahl_bias" in m.lora_B]
        with torch.no_grad():
            for bias in biases:
                bias.normal_()
        bare = model.get_base_model()
        names = ["ahl_a"] * 3 + ["ahl_bias"] * 3
        ids = bank.base.tokenize(TEXTS, 32)
        packed = packing.Packing.of(ids, "cpu")
        peft_loop, fallbacks = Linear._mixed_batch_forward, []
        monkeypatch.setattr(Linear, "_mixed_batch_forward", lambda *a, **k: fallbacks.append(1)
                            or peft_loop(*a, **k))
        with torch.inference_mode():
            with lora_batch.frozen(set(names)), lora_batch.rows(model, names,
                                                                packed.lengths.tolist()):
                got = packing.last_states(bare, bare.get_submodule(bank.base.layers_name), ids,
                                          packed)
            assert fallbacks
            with lora_batch.uninstalled(model):
                want = model(**bank.base.pad(ids), adapter_names=names).last_hidden_state
                for bias in biases:  # the bias counts: the check above could fail without it
                    bias.zero_()
                bias_free = model(**bank.base.pad(ids), adapter_names=names).last_hidden_state
        torch.testing.assert_close(got, packed.unpad(want), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(want, bias_free)
    finally:
        bank.remove_adapter("ahl_bias")


def test_evaluating_skips_eval_only_while_nothing_left_eval_mode(bank):
    """bank.evaluating skips model.eval() (a walk over every module) only where nothing can have
    left eval mode since: a new adapter's modules and model.train() are caught."""
    model = bank.evaluating("ahl_a")
    assert not any(m.training for m in model.modules())
    torch.manual_seed(4)
    bank.add_adapter("ahl_new", LoraConfig(r=4, lora_dropout=0.5, target_modules=["query"]),
                     ["u", "v"], get_method("lora"))
    try:
        assert any(m.training for m in model.modules())  # the new adapter's dropout trains
        assert bank.evaluating("ahl_a") is model
        assert not any(m.training for m in model.modules())
        model.train()
        bank.evaluating("ahl_new")
        assert not any(m.training for m in model.modules())
        twice = [bank.probabilities(TEXTS, ["ahl_new"] * len(TEXTS)) for _ in range(2)]
        torch.testing.assert_close(twice[0], twice[1], rtol=0, atol=0)  # no dropout left on
    finally:
        bank.remove_adapter("ahl_new")


def test_a_lora_loaded_without_pefts_walks_answers_as_pefts_loader(bank, tmp_path, monkeypatch):
    """lora_batch.load_frozen (each adapted layer visited once) gives the adapter peft's own
    load_adapter gives: the same layers, ranks, scalings and config, frozen, in eval mode, the
    same answers; and it declines, changing nothing, what it does not cover."""
    from peft.tuners.lora.layer import LoraLayer

    from adapterhub_local import lora_batch

    lean = []
    load_frozen = lora_batch.load_frozen
    monkeypatch.setattr(lora_batch, "load_frozen", lambda *a: lean.append(a[1]) or load_frozen(*a))
    for source in ("ahl_b", "ahl_top"):  # every block, and the top block only
        bank.save_adapter(source, tmp_path / source)
        bank.load_adapter(f"{source}_lean", tmp_path / source, get_method("lora"))
        with monkeypatch.context() as patch:
            patch.setattr(lora_batch, "load_frozen", lambda *a: False)
            bank.load_adapter(f"{source}_peft", tmp_path / source, get_method("lora"))
    assert lean == ["ahl_b_lean", "ahl_top_lean"]
    try:
        model = bank.model("ahl_b")
        for source in ("ahl_b", "ahl_top"):
            lean_name, peft_name = f"{source}_lean", f"{source}_peft"
            layers = [m for m in model.modules() if isinstance(m, LoraLayer) and peft_name in m.lora_A]
            assert layers and all(lean_name in m.lora_A for m in layers)
            assert sum(lean_name in m.lora_A for m in model.modules() if isinstance(m, LoraLayer)) == len(layers)
            for m in layers:
                assert (m.r[lean_name], m.scaling[lean_name]) == (m.r[peft_name], m.scaling[peft_name])
                for part in (m.lora_A, m.lora_B, m.lora_dropout):
                    assert not part[lean_name].training
                for part in (m.lora_A, m.lora_B):
                    assert torch.equal(part[lean_name].weight, part[peft_name].weight)
                    assert not part[lean_name].weight.requires_grad
            assert model.peft_config[lean_name].to_dict() == model.peft_config[peft_name].to_dict()
            adapters = [source, lean_name, peft_name]
            got = bank.probabilities(TEXTS * 3, [a for a in adapters for _ in TEXTS])
            for own, lean_p, peft_p in zip(got[:6], got[6:12], got[12:]):
                torch.testing.assert_close(lean_p, peft_p, rtol=0, atol=0)
                torch.testing.assert_close(lean_p, own, rtol=1e-5, atol=1e-6)
        # What it does not cover (here DoRA) is declined before anything changes.
        dora = LoraConfig(r=4, lora_alpha=8, target_modules=["query"], use_dora=True)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert load_frozen(model, "ahl_dora", dora, tmp_path / "ahl_b" / "adapter_model.safetensors") is False
        assert "ahl_dora" not in model.peft_config
        assert model.state_dict().keys() == before.keys()
    finally:
        for source in ("ahl_b", "ahl_top"):
            bank.remove_adapter(f"{source}_lean")
            bank.remove_adapter(f"{source}_peft")
    assert not any(n.endswith(("_lean", "_peft")) for n in model.peft_config)
