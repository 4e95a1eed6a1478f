"""EWC (METHOD §4): penalty and gradient, the Fisher, online accumulation, the loss the optimizer sees, a run."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from cpt.callbacks import EWCCallback
from cpt.errors import CptError
from cpt.recipe import default_training_args, validate_recipe
from cpt.runner import TaskSequenceRunner
from cpt.testing import build_tiny_model
from cpt.training.ewc import empirical_fisher, penalised_tensors, stored_steps
from cpt.training.trainer import CptSFTTrainer

from tiny_recipes import WORDS, strategy_recipe


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0, hidden_size=32)


@pytest.fixture
def model(tiny_path):
    return AutoModelForCausalLM.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return AutoTokenizer.from_pretrained(tiny_path)


def lora(model, seed=0):
    """A LoRA model with non-zero B (so the adapter changes the merged weights)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    return peft_model


def tokenized_rows(tokenizer, words):
    """prompt/completion rows tokenized by hand: labels = -100 on the prompt."""
    rows = []
    for word in words:
        prompt = tokenizer(f"Plural of {word}:")["input_ids"]
        completion = tokenizer(f" {word}s")["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return rows


def hand_loss(model, row):
    """Token-mean NLL of the completion, computed from the logits (independent of the model's loss)."""
    input_ids = torch.tensor([row["input_ids"]])
    labels = torch.tensor(row["labels"])
    logits = model(input_ids=input_ids).logits[0, :-1].float()
    targets = labels[1:]
    keep = targets != -100
    return torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="mean")


def per_example_fisher(model, rows, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean of per-example squared gradients, one example at a time with plain autograd."""
    sums = {name: torch.zeros_like(param, dtype=torch.float64) for name, param in params.items()}
    model.eval()
    for row in rows:
        grads = torch.autograd.grad(hand_loss(model, row), list(params.values()), allow_unused=True)
        for name, grad in zip(params, grads):
            if grad is not None:
                sums[name] += grad.double() ** 2
    return {name: total / len(rows) for name, total in sums.items()}


def collator(tokenizer):
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)


def random_state(model, seed=1, scale=3.0):
    """F > 0 and θ* ≠ θ for every penalised tensor, by hand."""
    generator = torch.Generator().manual_seed(seed)
    fisher, anchors = {}, {}
    for term in penalised_tensors(model):
        value = term.value()
        fisher[term.name] = torch.rand(value.shape, generator=generator) * scale
        anchors[term.name] = value + torch.randn(value.shape, generator=generator) * 0.1
    return fisher, anchors


# ---------------------------------------------------------------------- penalty and gradient
def test_penalty_and_gradient_match_hand_computation(model):
    model.model.embed_tokens.weight.requires_grad_(False)  # a frozen tensor is not penalised
    ewc = EWCCallback(ewc_lambda=7.0)
    assert float(ewc.loss_term(model)) == 0.0, "no penalty before the first task ends"
    ewc.fisher, ewc.anchors = random_state(model)
    assert "model.embed_tokens.weight" not in ewc.fisher and "lm_head.weight" in ewc.fisher

    penalty = ewc.loss_term(model)
    params = dict(model.named_parameters())
    expected = sum(
        (ewc.fisher[n].double() * (params[n].detach().double() - ewc.anchors[n].double()) ** 2).sum()
        for n in ewc.fisher
    )
    assert penalty.dtype == torch.float32
    torch.testing.assert_close(penalty.double(), 3.5 * expected, rtol=1e-5, atol=0)

    penalty.backward()
    for name in ewc.fisher:
        hand = 7.0 * ewc.fisher[name] * (params[name].detach() - ewc.anchors[name])
        torch.testing.assert_close(params[name].grad, hand, rtol=1e-5, atol=1e-7, msg=name)
    assert model.model.embed_tokens.weight.grad is None


def test_lora_penalty_is_on_merged_weights(model):
    peft_model = lora(model)
    terms = penalised_tensors(peft_model)
    names = sorted(term.name for term in terms)
    assert names == sorted(f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj"))
    ewc = EWCCallback(ewc_lambda=3.0)
    ewc.fisher, ewc.anchors = random_state(peft_model)

    # Hand computation with plain autograd on W = W0 + s·B·A.
    base = peft_model.get_base_model()
    leaves, expected = [], 0.0
    for name in names:
        layer = base.get_submodule(name.removesuffix(".weight"))
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        merged = layer.base_layer.weight.double() + layer.scaling["default"] * (lora_b.double() @ lora_a.double())
        expected = expected + (ewc.fisher[name].double() * (merged - ewc.anchors[name].double()) ** 2).sum()
        leaves += [lora_a, lora_b]
    expected = 1.5 * expected
    hand_grads = torch.autograd.grad(expected, leaves)

    penalty = ewc.loss_term(peft_model)
    torch.testing.assert_close(penalty.double(), expected.detach(), rtol=1e-5, atol=0)
    grads = torch.autograd.grad(penalty, leaves)
    for grad, hand in zip(grads, hand_grads):
        torch.testing.assert_close(grad, hand, rtol=1e-4, atol=1e-8)
    # θ* taken from the live model is the merged weight, exactly as the saved state holds it.
    from cpt.tensors import model_tensors

    merged_state = dict(model_tensors(peft_model))
    for term in terms:
        assert torch.equal(term.value(), merged_state[term.name])


# ---------------------------------------------------------------------- the Fisher
def test_fisher_is_mean_of_per_example_squared_gradients(model, tokenizer):
    rows = tokenized_rows(tokenizer, WORDS[:4])
    fisher = empirical_fisher(model, rows, collator(tokenizer))
    model.train()
    expected = per_example_fisher(model, rows, {n: p for n, p in model.named_parameters() if p.requires_grad})
    assert set(fisher) == set(expected)
    for name in expected:
        torch.testing.assert_close(fisher[name].double(), expected[name], rtol=1e-4, atol=1e-12, msg=name)
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    assert all(param.grad is None for param in model.parameters()), "the Fisher leaves .grad alone"


def test_lora_fisher_is_full_weight_fisher_of_merged_model(model, tokenizer):
    rows = tokenized_rows(tokenizer, WORDS[:3])
    peft_model = lora(model)
    peft_model.train()
    merged = copy.deepcopy(peft_model).merge_and_unload()
    fisher = empirical_fisher(peft_model, rows, collator(tokenizer))
    assert peft_model.training, "training mode restored"
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n), (
        "base weights frozen again"
    )

    targets = {name: merged.get_parameter(name) for name in fisher}
    for param in targets.values():
        param.requires_grad_(True)
    expected = per_example_fisher(merged, rows, targets)
    for name in expected:
        torch.testing.assert_close(fisher[name].double(), expected[name], rtol=1e-4, atol=1e-12, msg=name)


def fake_end_of_task(ewc, model, rows, tokenizer, seed=5):
    loader = SimpleNamespace(dataset=rows, collate_fn=collator(tokenizer))
    ewc.on_train_end(
        SimpleNamespace(seed=seed),
        SimpleNamespace(is_world_process_zero=True),
        None,
        model=model,
        train_dataloader=loader,
    )


def test_online_accumulation_and_persistence(model, tokenizer, tmp_path):
    rows = tokenized_rows(tokenizer, WORDS[:3])
    params = {n: p for n, p in model.named_parameters()}
    ewc = EWCCallback(ewc_lambda=2.0, gamma=0.5, fisher_examples=8, output_dir=tmp_path / "ewc")
    assert ewc.step == 1
    fake_end_of_task(ewc, model, rows, tokenizer)
    first = per_example_fisher(model, rows, params)
    for name in first:
        torch.testing.assert_close(ewc.fisher[name].double(), first[name], rtol=1e-4, atol=1e-12)
        assert torch.equal(ewc.anchors[name], params[name].detach())
    assert stored_steps(tmp_path / "ewc") == [1] and ewc.step == 2

    with torch.no_grad():  # "train" task 2
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    rows2 = tokenized_rows(tokenizer, WORDS[3:6])
    fake_end_of_task(ewc, model, rows2, tokenizer)
    second = per_example_fisher(model, rows2, params)
    for name in first:
        torch.testing.assert_close(ewc.fisher[name].double(), 0.5 * first[name] + second[name], rtol=1e-4, atol=1e-12)
        assert torch.equal(ewc.anchors[name], params[name].detach())

    # Resume: a new callback reads the files of the step before its own.
    resumed = EWCCallback(ewc_lambda=2.0, gamma=0.5, output_dir=tmp_path / "ewc", step=3)
    for name in first:
        assert torch.equal(resumed.fisher[name], ewc.fisher[name]) and torch.equal(
            resumed.anchors[name], ewc.anchors[name]
        )
    assert resumed.fisher[name].dtype == torch.float32
    retrain = EWCCallback(output_dir=tmp_path / "ewc", step=2)  # task 2 retrained after a kill: F, θ* of task 1
    for name in first:
        torch.testing.assert_close(retrain.fisher[name].double(), first[name], rtol=1e-4, atol=1e-12)
    assert EWCCallback(output_dir=tmp_path / "ewc").step == 3, "default step: after the newest stored"
    fake_end_of_task(resumed, model, rows, tokenizer)
    assert stored_steps(tmp_path / "ewc") == [2, 3], "only the previous step is kept"
    with pytest.raises(CptError, match="no Fisher/anchors of task 1"):
        EWCCallback(output_dir=tmp_path / "ewc", step=2)


def test_state_folder_marker_sets_the_step(model, tokenizer, tmp_path):
    """With state_dir, one callback follows the state folder's cpt_state.json: a retrained task gets the F, θ* before it."""
    state = tmp_path / "state"
    rows = tokenized_rows(tokenizer, WORDS[:3])
    ewc = EWCCallback(ewc_lambda=2.0, fisher_examples=4, output_dir=tmp_path / "ewc", state_dir=state)

    def begin(callback):
        callback.on_train_begin(SimpleNamespace(run_name=None), SimpleNamespace(is_world_process_zero=True), None)

    def mark(step):
        state.mkdir(exist_ok=True)
        (state / "cpt_state.json").write_text(json.dumps({"step": step, "task": f"task{step}"}))

    begin(ewc)
    assert ewc.step == 1 and ewc.fisher is None, "no marker yet: the callback keeps its own count"
    fake_end_of_task(ewc, model, rows, tokenizer)
    first = {name: value.clone() for name, value in ewc.fisher.items()}
    mark(1)
    begin(ewc)
    assert ewc.step == 2
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    fake_end_of_task(ewc, model, tokenized_rows(tokenizer, WORDS[3:6]), tokenizer)
    assert ewc.step == 3 and not torch.equal(ewc.fisher[next(iter(first))], first[next(iter(first))])
    begin(ewc)  # the state still holds task 1 (task 2 is trained again): back to F, θ* of task 1
    assert ewc.step == 2 and all(torch.equal(ewc.fisher[name], first[name]) for name in first)
    assert EWCCallback(output_dir=tmp_path / "ewc", state_dir=state).step == 2, "a new callback starts from the marker"
    pinned = EWCCallback(output_dir=tmp_path / "ewc", state_dir=state, step=3)
    begin(pinned)
    assert pinned.step == 3, "an explicit step overrides the marker"

    unstored = EWCCallback(state_dir=state)
    assert unstored.step == 2 and unstored.fisher is None
    fake_end_of_task(unstored, model, rows, tokenizer)
    with pytest.raises(CptError, match="give it output_dir="):
        begin(unstored)


# ---------------------------------------------------------------------- the loss the optimizer sees
class GradientCapture(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_optimizer_sees_sft_loss_plus_penalty(tiny_path, tokenizer, tmp_path, accumulation):
    import datasets

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    reference = copy.deepcopy(model)
    ewc = EWCCallback(ewc_lambda=50.0)
    fisher, anchors = random_state(model, seed=3, scale=1e-3)  # penalty ≈ the SFT loss in size
    ewc.fisher, ewc.anchors = {n: f.clone() for n, f in fisher.items()}, dict(anchors)
    capture = GradientCapture()
    data = datasets.Dataset.from_list([{"prompt": f"Plural of {w}:", "completion": f" {w}s"} for w in WORDS[:4]])
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        **{
            **default_training_args(),
            "max_steps": 1,
            "per_device_train_batch_size": 4 // accumulation,
            "gradient_accumulation_steps": accumulation,
            "max_grad_norm": 0,
            "logging_steps": 1,
            "disable_tqdm": True,
            "seed": 0,
        },
    )
    trainer = CptSFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[ewc, capture]
    )
    assert trainer.model_accepts_loss_kwargs, (
        "the case where each micro-batch loss is already normalised for accumulation"
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.train()

    # Independently: token-mean SFT loss over the step's 4 examples + (λ/2) Σ F (θ − θ*)².
    params = dict(reference.named_parameters())
    sft = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    penalty = 25.0 * sum((fisher[n] * (params[n] - anchors[n]) ** 2).sum() for n in fisher)
    expected = sft + penalty
    expected_grads = dict(zip(params, torch.autograd.grad(expected, list(params.values()))))
    for name, grad in capture.grads.items():
        torch.testing.assert_close(
            grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert logged["ewc_penalty"] == pytest.approx(penalty.item(), rel=1e-4)


# ---------------------------------------------------------------------- end to end
def test_two_task_ewc_run(tmp_path, tiny_path):
    strategy = {"name": "ewc", "ewc_lambda": 1000.0, "gamma": 0.9, "fisher_examples": 4}
    upper_fields = {"prompt": "word", "completion": "answer", "chat": True}
    recipe = validate_recipe(strategy_recipe(tmp_path, tiny_path, strategy, upper_fields=upper_fields))
    result = TaskSequenceRunner(recipe).run()
    assert len(result.matrix) == 3 and all(len(row) == 2 for row in result.matrix[1:])
    folder = recipe.run_dir / "strategy" / "ewc"
    assert stored_steps(folder) == [1, 2]
    fisher, anchors = (
        load_file(folder / "step_2" / "fisher.safetensors"),
        load_file(folder / "step_2" / "anchors.safetensors"),
    )
    state = load_file(recipe.run_dir / "state" / "model.safetensors")
    assert set(fisher) == set(anchors) == set(state)
    for name, tensor in anchors.items():
        assert torch.equal(tensor, state[name]), "θ* = the weights at the end of the task = the state"
    assert all(bool((f >= 0).all()) for f in fisher.values()) and sum(float(f.sum()) for f in fisher.values()) > 0
    stats = json.loads((recipe.run_dir / "integration" / "2_upper.json").read_text())
    assert stats["ewc_step"] == 2 and stats["fisher_examples"] == 4
    manifest = json.loads((recipe.run_dir / "manifest.json").read_text())
    assert [task["status"] for task in manifest["tasks"]] == ["done", "done"]
