"""moec inside Hugging Face Trainer: a few AdamW steps with the load-balancing loss on give
eager's losses, and the auxiliary loss's gradient reaches the router weights.

accelerate (which Trainer compiles through) accepts only its own list of backend names in
`torch_compile_backend`, so `"moec"` is rejected there; compiling `model.forward` before
handing the model to Trainer is the way in, and keeps the model's class and signature."""
import pytest
import torch
import transformers as tf
from torch._dynamo.utils import counters

from hf_models import causal_lm

pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (a test dependency)")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(3, 96, (12, 8), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(arch):
    model = causal_lm(arch, "grouped_mm")
    model.config.output_router_logits, model.config.router_aux_loss_coef = True, 0.1
    return model


def _train(model, tmp_path):
    losses = []

    class Record(tf.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])
    args = tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                                save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    tf.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[Record()]).train()
    return losses


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_trainer_losses_match_eager(arch, tmp_path):
    expected = _train(_model(arch), tmp_path)
    model = _model(arch)
    model.forward = torch.compile(model.forward, backend="moec", options={"dense_backend": "eager"})
    got = _train(model, tmp_path)
    assert len(got) == len(expected) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    assert counters["moec"]["regions_fused"] >= model.config.num_hidden_layers


def test_aux_loss_gradient_reaches_router():
    model = _model("qwen3_moe")
    tokens = torch.randint(3, 96, (2, 8))
    eager_aux = model(tokens).aux_loss
    [router_weight] = [p for n, p in model.named_parameters() if n == "model.layers.0.mlp.gate.weight"]
    expected = torch.autograd.grad(eager_aux, router_weight)[0]
    compiled = torch.compile(model, backend="moec", options={"dense_backend": "eager"})
    aux = compiled(tokens).aux_loss
    got = torch.autograd.grad(aux, router_weight)[0]
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert counters["moec"]["regions_fused"] == model.config.num_hidden_layers
