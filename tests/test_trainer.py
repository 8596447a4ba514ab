"""The trainer's levers: the bottom half run once per text, bf16 arithmetic, checked options."""

import math

import pytest
import torch

from adapterhub_local.errors import AhlError
from adapterhub_local.inference import bank_for
from adapterhub_local.methods import get_method, method_options
from adapterhub_local.trainer import TrainOptions, auto_epochs, train_adapter

FAST = TrainOptions(epochs=6, lr=5e-3, batch_size=16)


@pytest.fixture
def colors(tiny_data):
    from adapterhub_local.data import load_task_data

    return load_task_data("colors", tiny_data["colors"]["train"], tiny_data["colors"]["test"])


@pytest.fixture
def train(tiny_base):
    """train(data, **changes) -> (bank, report, how often the bottom block ran) for a default
    LoRA trained on data; the adapter leaves the process's bank afterwards."""
    from dataclasses import replace

    from adapterhub_local.base import load_base

    base = load_base(tiny_base)
    bank = bank_for(base)

    def run(data, **changes):
        bank.remove_adapter("ahl-colors")
        runs = []
        hook = base.layers[0].register_forward_hook(lambda *args: runs.append(1))
        try:
            config = get_method("lora").build(method_options("lora"), base)
            report = train_adapter(bank, "ahl-colors", config, data, replace(FAST, **changes),
                                   get_method("lora"))
        finally:
            hook.remove()
        return bank, report, len(runs)

    yield run
    bank.remove_adapter("ahl-colors")


def test_the_bottom_half_runs_once_per_text_not_once_per_step(train, colors):
    bank, report, runs = train(colors)
    encode_batches = math.ceil(len(colors.train_texts) / 64)  # inference.EVAL_BATCH_SIZE
    assert runs <= encode_batches < report.steps
    torch.testing.assert_close(report.features, bank.features(colors.train_texts))
    assert bank.accuracy("ahl-colors", colors.test_texts, colors.test_labels) >= 0.9

    _, plain, plain_runs = train(colors, reuse_states=False, precision="fp32")
    assert plain_runs >= plain.steps and plain.features is None and plain.precision == "fp32"


def test_bf16_arithmetic_keeps_fp32_weights_and_learns(train, colors):
    bank, report, _ = train(colors, precision="bf16")
    assert report.precision == "bf16"
    weights = bank.trainable_parameters("ahl-colors")
    assert weights and all(p.dtype == torch.float32 for p in weights)
    assert math.isfinite(report.final_loss)
    assert bank.accuracy("ahl-colors", colors.test_texts, colors.test_labels) >= 0.9


def test_without_validation_the_adapter_trains_on_every_row(train, colors):
    _, held, _ = train(colors)
    assert held.val_rows > 0 and held.train_rows + held.val_rows == len(colors.train_texts)
    assert 0 <= held.val_accuracy <= 1

    bank, every, _ = train(colors, validate=False)
    assert (every.train_rows, every.val_rows) == (len(colors.train_texts), 0)
    assert math.isnan(every.val_accuracy)
    # The router's features still cover every row: it holds its calibration rows out itself.
    assert len(every.features) == len(colors.train_texts)
    assert bank.accuracy("ahl-colors", colors.test_texts, colors.test_labels) >= 0.9


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(AhlError, match="--precision must be one of auto, bf16, fp32"):
        TrainOptions(precision="fp8")


def test_a_switch_given_as_a_string_is_refused():
    with pytest.raises(AhlError, match=r"validate must be true or false, got 'false': write validate = false"):
        TrainOptions(validate="false")  # a spec's validate = "false" would read as true


def test_byte_dropout_drops_at_rate_p_and_keeps_the_mean():
    from adapterhub_local.trainer import ByteDropout

    torch.manual_seed(0)
    x = torch.ones(400_000)
    for p in (0.05, 0.1, 0.5):
        y = ByteDropout(p).train()(x)
        # Each of the four 16-bit words of a random int64 decides every fourth element: each
        # position drops at rate p, the most significant word's (15 random bits) included.
        rates = (y.view(-1, 4) == 0).float().mean(0)
        assert ((rates - p).abs() < 0.006).all(), rates
        assert abs(y.mean().item() - 1) < 0.02
        assert y.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    assert torch.equal(ByteDropout(0.1).eval()(x), x)
    odd = torch.ones(7, 3, requires_grad=True)  # not a multiple of four elements
    y = ByteDropout(0.5).train()(odd)
    y.sum().backward()
    assert torch.equal(odd.grad, y.detach())  # the gradient is the mask: zero or 1 / (1 - p)


def test_byte_dropout_swaps_every_dropout_and_puts_them_back(tiny_base):
    from transformers import AutoModel

    from adapterhub_local.trainer import ByteDropout, byte_dropout

    model = AutoModel.from_pretrained(tiny_base)
    before = [type(m) for m in model.modules()]
    with byte_dropout(model):
        inside = [type(m) for m in model.modules()]
        assert torch.nn.Dropout not in inside and ByteDropout in inside
    assert [type(m) for m in model.modules()] == before


def test_bf16_weights_hold_frozen_linears_in_bf16_for_the_same_outputs(tiny_base):
    """Inside, a forward under bf16 autocast gives the very numbers it gives outside (autocast
    rounds the fp32 weights to bf16 the same way), from bf16 copies held once; the trainable
    and tied weights and every original tensor come back untouched."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from adapterhub_local.trainer import bf16_weights

    torch.manual_seed(0)
    model = get_peft_model(AutoModel.from_pretrained(tiny_base),
                           LoraConfig(r=4, target_modules=["query", "value", "dense"]),
                           adapter_name="colors").eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # peft starts B at zero: a LoRA that changes nothing
    query = model.base_model.model.encoder.layer[0].attention.self.query
    frozen, trainable = query.base_layer.weight, query.lora_A["colors"].weight
    embeddings = model.base_model.model.embeddings.word_embeddings.weight
    storage = frozen.data_ptr()
    batch = {"input_ids": torch.tensor([[2, 5, 7, 9, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**batch).last_hidden_state

    outside = forward()
    with bf16_weights(model):
        assert frozen.dtype == torch.bfloat16 and not query.cast_input_dtype_enabled
        assert trainable.dtype == embeddings.dtype == torch.float32
        inside = forward()
    assert torch.equal(inside, outside)
    assert frozen.dtype == torch.float32 and frozen.data_ptr() == storage
    assert query.cast_input_dtype_enabled
    with bf16_weights(model, enabled=False):
        assert frozen.dtype == torch.float32


def test_small_tasks_get_epochs_enough_for_a_hundred_steps():
    every = TrainOptions(validate=False)  # every row trains: the counts below are the rows
    assert auto_epochs([0, 1] * 675, every) == 3  # 43 steps an epoch: 129 in the usual 3
    assert auto_epochs([0, 1] * 405, every) == 4  # 26 steps an epoch: 104 in 4
    assert auto_epochs([0, 1] * 313, every) == 5  # 20 steps an epoch
    assert auto_epochs([0] * 40, every) == 5 and auto_epochs([], every) == 5  # at most 5
    # validating holds a tenth out (at most 200): 900 rows train 810, 26 steps an epoch
    assert auto_epochs([0, 1, 2] * 300, TrainOptions()) == 4


@pytest.mark.parametrize("option, value, message", [
    ("epochs", "three", "epochs must be a whole number, got 'three': write epochs = 3"),
    ("lr", "1e-3", "lr must be a number, got '1e-3': write lr = 0.002"),
    ("batch_size", True, "batch_size must be a whole number, got True"),
    ("precision", 16, "precision must be text, got 16"),
])
def test_an_option_of_the_wrong_type_is_one_line_not_a_traceback(option, value, message):
    with pytest.raises(AhlError, match=message):
        TrainOptions(**{option: value})
    assert TrainOptions(lr=1).lr == 1  # an integer where a float goes is a number all the same
