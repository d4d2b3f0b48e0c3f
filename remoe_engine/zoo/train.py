"""Train a built-in model: byte-level BPE tokenizer, Qwen3-MoE pretraining, evaluation, card.

`run(TrainConfig(...))` does everything `remoe zoo train` does and writes a checkpoint directory
that plain `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load:
config.json, model.safetensors, tokenizer files, generation_config.json, MODEL_CARD.md,
card.json (the card's figures, machine-readable), loss_curve.png and heldout_slice.safetensors
(the token ids the card's slice figures were computed on, so a test can recompute them on any
Python). Every random choice is seeded; on one machine and thread count a rerun is bit-identical.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import platform
import random
import shlex
import time
from dataclasses import dataclass

import torch

from remoe_engine.evaluation import perplexity, windows
from remoe_engine.zoo import ZooError
from remoe_engine.zoo import data as zdata
from remoe_engine.zoo.evaluate import evaluate

EOS = "<|endoftext|>"
# Usage share above which one expert counts as dominating its layer: 4x the uniform share K/E...
# divided by K, i.e. 4/E. The card states it and the tests hold the checkpoint to it.
MAX_SHARE_FACTOR = 4.0
# No trailing newline: byte-level BPE merges a newline with the next line's indentation, so a
# prompt ending in a bare newline would end on a token boundary the model rarely saw.
SAMPLE_PROMPT = "def read_config(path):"


@dataclass
class TrainConfig:
    """Everything that determines a training run (the card records all of it).

    Args:
        out: output checkpoint directory (created; existing files of the same names replaced).
        data: corpus folder; None means this Python's standard library `.py` sources.
        suffixes: file endings read from `data` (None: see `data.discover`).
        seed: seeds the split, the initialisation and the batch sampling.
        held_out_fraction: expected share of files held out.
        steps: optimizer steps (the learning-rate schedule's length).
        minutes: optional wall-clock cap; training stops early when it is reached.
        layers / experts / top_k / hidden / moe_intermediate / heads / kv_heads / head_dim:
            the Qwen3-MoE shape (every layer is an MoE layer, no shared expert).
        vocab: BPE vocabulary size, special token included.
        seq_len / batch: training window length and windows per step.
        lr / warmup / min_lr_ratio / weight_decay / grad_clip: AdamW, linear warm-up, cosine decay
            to `min_lr_ratio * lr`.
        aux_coef: load-balancing loss coefficient (router_aux_loss_coef).
        norm_topk_prob: renormalise the top-K routing weights to sum to 1.
        eval_every: steps between held-out loss points on the loss curve.
        slice_tokens: length of the held-out slice shipped with the checkpoint for fast tests.
        block: tokens per block for the distinct-experts statistic.
        threads: torch CPU threads (None: torch's default).
        progress: show a tqdm progress bar.
        name: the checkpoint's name on its card.
    """

    out: pathlib.Path
    data: pathlib.Path | None = None
    suffixes: list[str] | None = None
    seed: int = 0
    held_out_fraction: float = 0.1
    steps: int = 2500
    minutes: float | None = None
    layers: int = 4
    experts: int = 32
    top_k: int = 4
    hidden: int = 128
    moe_intermediate: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    vocab: int = 4096
    seq_len: int = 256
    batch: int = 8
    lr: float = 3e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_coef: float = 0.01
    norm_topk_prob: bool = True
    eval_every: int = 250
    slice_tokens: int = 16384
    block: int = 16
    threads: int | None = None
    progress: bool = True
    name: str = "tiny"

    def validate(self) -> None:
        """Check the shape and schedule.

        Raises:
            ZooError: naming the first bad value.
        """
        positive = ("steps", "layers", "experts", "top_k", "hidden", "moe_intermediate", "heads",
                    "kv_heads", "head_dim", "seq_len", "batch", "eval_every", "block")
        for name in positive:
            if getattr(self, name) < 1:
                raise ZooError(f"--{name.replace('_', '-')} must be at least 1, got "
                               f"{getattr(self, name)}")
        if self.top_k > self.experts:
            raise ZooError(f"--top-k {self.top_k} exceeds --experts {self.experts}")
        if self.heads % self.kv_heads:
            raise ZooError(f"--heads {self.heads} is not a multiple of --kv-heads {self.kv_heads}")
        if self.vocab < 258:
            raise ZooError(
                f"--vocab must be at least 258 (256 bytes + end-of-text), got {self.vocab}"
            )
        if self.seq_len % self.block:
            raise ZooError(f"--seq-len {self.seq_len} must be a multiple of --block {self.block}")
        if self.minutes is not None and self.minutes <= 0:
            raise ZooError(f"--minutes must be positive, got {self.minutes}")
        if self.lr <= 0:
            raise ZooError(f"--lr must be positive, got {self.lr}")


# A CI-size run: seconds on 2 cores, same code path as the real one.
TINY_OVERRIDES = dict(
    steps=30, layers=2, experts=8, top_k=2, hidden=32, moe_intermediate=32, heads=2, kv_heads=1,
    head_dim=16, vocab=512, seq_len=64, batch=4, warmup=5, eval_every=10, slice_tokens=1024,
    name="tiny-smoke",
)


def command_for(cfg: TrainConfig) -> str:
    """The `remoe zoo train` command line that reproduces a config (every option explicit).

    Args:
        cfg: the run's config.

    Returns:
        A shell-quoted command line.
    """
    args = ["remoe", "zoo", "train", "--out", str(cfg.out)]
    if cfg.data is not None:
        args += ["--data", str(cfg.data)]
    if cfg.suffixes:
        for s in cfg.suffixes:
            args += ["--suffix", s]
    for name in ("seed", "held_out_fraction", "steps", "layers", "experts", "top_k", "hidden",
                 "moe_intermediate", "heads", "kv_heads", "head_dim", "vocab", "seq_len", "batch",
                 "lr", "warmup", "weight_decay", "aux_coef", "eval_every", "slice_tokens"):
        args += ["--" + name.replace("_", "-"), str(getattr(cfg, name))]
    if cfg.minutes is not None:
        args += ["--minutes", str(cfg.minutes)]
    if not cfg.norm_topk_prob:
        args += ["--no-norm-topk-prob"]
    if cfg.threads is not None:
        args += ["--threads", str(cfg.threads)]
    return shlex.join(args)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenisation, no prefix space).

    Args:
        texts: training texts (one per file).
        vocab_size: final vocabulary size, the end-of-text token included.

    Returns:
        A `PreTrainedTokenizerFast` with `<|endoftext|>` as eos and pad token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # No prefix space: code starts lines with keywords and indentation, not with a space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        # Every byte is in the vocabulary, so any input (any language, any bytes) encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, clean_up_tokenization_spaces=False
    )


def encode_files(tokenizer, texts: list[str]) -> torch.Tensor:
    """Tokenize files into one stream, each file followed by end-of-text.

    Args:
        tokenizer: a `PreTrainedTokenizerFast`.
        texts: file texts in stream order.

    Returns:
        int32 tensor [N].
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(enc.ids)
        stream.append(eos)
    return torch.tensor(stream, dtype=torch.int32)


def build_model(cfg: TrainConfig, eos_id: int):
    """A freshly initialised Qwen3-MoE causal LM of the config's shape (seeded by the caller).

    Args:
        cfg: the run's config.
        eos_id: end-of-text token id (also bos and pad).

    Returns:
        `Qwen3MoeForCausalLM` in float32, with `output_router_logits=True` for training.
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        # Unused (every layer is sparse) but the config requires one; a dense-equivalent width.
        intermediate_size=cfg.moe_intermediate * cfg.top_k,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        moe_intermediate_size=cfg.moe_intermediate,
        num_experts=cfg.experts,
        num_experts_per_tok=cfg.top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=cfg.norm_topk_prob,
        output_router_logits=True,
        router_aux_loss_coef=cfg.aux_coef,
        max_position_embeddings=max(2048, cfg.seq_len),
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attention_dropout=0.0,
    )
    return Qwen3MoeForCausalLM(config).float()


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """The Switch/Mixtral load-balancing loss, per MoE layer, averaged over layers.

    transformers' built-in `load_balancing_loss_func` pools the tokens of all layers before
    counting, so it only balances expert e summed over layers and lets one layer leave experts
    idle; an engine that caches experts per layer needs every layer balanced.

    Args:
        router_logits: one [T, E] tensor per MoE layer.
        top_k: experts per token.

    Returns:
        Scalar tensor; its value is top_k for perfectly balanced routing.
    """
    losses = []
    for logits in router_logits:  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        num_experts = probs.shape[-1]
        chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, num_experts)
        frac = chosen.sum(dim=1).float().mean(dim=0)  # [E], sums to top_k
        losses.append(num_experts * (frac * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to `min_lr_ratio * lr` (step counts from 0)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class _Corpus:
    """The run's text, split and tokenized: what training, evaluation and the card read.

    Args:
        files / train_files / held_files: every discovered `data.TextFile`, and the split.
        tokenizer: the BPE tokenizer, trained on the training files only.
        train_ids / held_ids: int32 [N] token streams, each file followed by end-of-text.
        held_wins: int64 [W, S] every full held-out window (S = seq_len).
        slice_wins: int64 [W', S] the first `slice_tokens` of them, shipped with the checkpoint.
    """

    files: list
    train_files: list
    held_files: list
    tokenizer: object
    train_ids: torch.Tensor
    held_ids: torch.Tensor
    held_wins: torch.Tensor
    slice_wins: torch.Tensor


@dataclass
class _Trained:
    """What the training loop leaves for the card and the loss curve.

    Args:
        history: per step, {"step", "ce", "aux", "grad_norm"}.
        held_curve: (step, held-out CE on the first 16 slice windows) points.
        stopped_early: the `minutes` cap ended training before `steps`.
        wall_s: seconds spent in the loop.
        final_train_loss: mean CE of the last 50 steps (fewer if fewer ran).
    """

    history: list[dict]
    held_curve: list[tuple[int, float]]
    stopped_early: bool
    wall_s: float
    final_train_loss: float

    @property
    def steps_done(self) -> int:
        return len(self.history)


@dataclass
class _Evaluation:
    """The saved checkpoint's figures, measured on the checkpoint as reloaded from disk.

    Args:
        model: the reloaded `AutoModelForCausalLM`.
        ppl_full / ppl_slice: `evaluate`'s perplexity dicts on all held-out windows / the slice.
        routing_full / routing_slice: `evaluate`'s routing statistics on the same windows.
        sample: the greedy continuation of `SAMPLE_PROMPT`, prompt included.
    """

    model: object
    ppl_full: dict
    ppl_slice: dict
    routing_full: object
    routing_slice: object
    sample: str


def run(cfg: TrainConfig, log=print) -> dict:
    """Train, save, evaluate the saved checkpoint and write its card.

    Args:
        cfg: the run's config.
        log: callable taking one line of progress text.

    Returns:
        The card dict (also written to `cfg.out / "card.json"`).

    Raises:
        ZooError: bad config or unusable data folder.
    """
    cfg.validate()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    corpus = _prepare_corpus(cfg, log)
    _seed_everything(cfg.seed)
    model = build_model(cfg, corpus.tokenizer.eos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: Qwen3-MoE {cfg.layers} layers x {cfg.experts} experts (top-{cfg.top_k}), "
        f"hidden {cfg.hidden}, {n_params / 1e6:.2f}M parameters")
    trained = _train(model, corpus, cfg, log)
    _save_checkpoint(model, corpus, out)
    evaluation = _evaluate_checkpoint(out, corpus, cfg, log)

    card = _card_dict(cfg, corpus, n_params, trained, evaluation, time.perf_counter() - t_start)
    plot_loss(trained.history, trained.held_curve, out / "loss_curve.png",
              title=f"{cfg.name}: {card['summary']}")
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(render_card(card))
    return card


def _prepare_corpus(cfg: TrainConfig, log) -> _Corpus:
    """Read and split the files, train the tokenizer, tokenize both shares and cut windows.

    Args:
        cfg: the run's config.
        log: callable taking one line of progress text.

    Returns:
        The `_Corpus`.

    Raises:
        ZooError: unusable data folder, or too little text for one training or held-out window.
    """
    files = zdata.discover(cfg.data, cfg.suffixes)
    train_files, held_files = zdata.split(files, cfg.held_out_fraction, cfg.seed)
    train_texts = [f.read() for f in train_files]
    held_texts = [f.read() for f in held_files]
    log(f"data: {len(files)} files ({len(train_files)} train, {len(held_files)} held out), "
        f"{sum(map(len, train_texts)) / 1e6:.1f}M train characters")

    t0 = time.perf_counter()
    # Trained on the training files only, so held-out text is unseen.
    tokenizer = train_tokenizer(train_texts, cfg.vocab)
    train_ids = encode_files(tokenizer, train_texts)
    held_ids = encode_files(tokenizer, held_texts)
    log(f"tokenizer: vocab {len(tokenizer)}, {train_ids.numel():,} train tokens, "
        f"{held_ids.numel():,} held-out tokens ({time.perf_counter() - t0:.0f}s)")
    if train_ids.numel() <= cfg.seq_len + 1:
        raise ZooError(f"training text is only {train_ids.numel()} tokens; need more than "
                       f"--seq-len {cfg.seq_len}")
    if held_ids.numel() < cfg.seq_len:
        raise ZooError(f"held-out text is only {held_ids.numel()} tokens; need at least "
                       f"--seq-len {cfg.seq_len} (add files or raise --held-out-fraction)")
    return _Corpus(
        files=files, train_files=train_files, held_files=held_files, tokenizer=tokenizer,
        train_ids=train_ids, held_ids=held_ids,
        held_wins=windows(held_ids, cfg.seq_len),
        slice_wins=windows(held_ids, cfg.seq_len, cfg.slice_tokens),
    )


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only.

    Args:
        model: the model to train.
        cfg: the run's config (lr, weight_decay).

    Returns:
        The optimizer.
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms: decaying them only hurts
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )


def _random_batch(train_ids: torch.Tensor, cfg: TrainConfig,
                  gen: torch.Generator) -> torch.Tensor:
    """Uniformly random windows of the training stream.

    Crossing file ends is fine: the end-of-text token separates files, as at inference.

    Args:
        train_ids: int32 [N] training stream.
        cfg: the run's config (batch, seq_len).
        gen: the run's batch-sampling generator (advanced by one draw).

    Returns:
        int64 [B, S] token windows.
    """
    max_start = train_ids.numel() - cfg.seq_len - 1
    starts = torch.randint(0, max_start + 1, (cfg.batch,), generator=gen)
    return torch.stack([train_ids[s : s + cfg.seq_len] for s in starts.tolist()]).long()


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor,
                cfg: TrainConfig) -> tuple[float, float, float]:
    """One optimizer step on next-token cross-entropy plus the per-layer balance loss.

    Args:
        model: the model being trained.
        opt: its optimizer, learning rate already set for this step.
        batch: int64 [B, S] token windows.
        cfg: the run's config (top_k, aux_coef, grad_clip).

    Returns:
        (cross-entropy, balance loss, gradient norm before clipping).
    """
    # The held-out checks between steps leave the model in eval mode.
    model.train()
    outputs = model(input_ids=batch, use_cache=False, output_router_logits=True)
    logits = outputs.logits  # [B, S, V]
    ce_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )
    aux_loss = balance_loss(outputs.router_logits, cfg.top_k)
    (ce_loss + cfg.aux_coef * aux_loss).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(ce_loss.detach()), float(aux_loss.detach()), float(grad_norm)


def _train(model: torch.nn.Module, corpus: _Corpus, cfg: TrainConfig, log) -> _Trained:
    """Pretrain the model in place for `cfg.steps` steps or until the `minutes` cap.

    Args:
        model: freshly built by `build_model`, after the run's seed was set.
        corpus: the run's `_Corpus`.
        cfg: the run's config.
        log: callable taking one line of progress text.

    Returns:
        The `_Trained` record.
    """
    from tqdm.auto import tqdm

    opt = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    monitor_wins = corpus.slice_wins[:16]
    history: list[dict] = []
    held_curve: list[tuple[int, float]] = []
    t_train = time.perf_counter()
    stopped_early = False
    bar = tqdm(range(cfg.steps), desc="train", disable=not cfg.progress, mininterval=2.0)
    for step in bar:
        if cfg.minutes is not None and time.perf_counter() - t_train > cfg.minutes * 60:
            stopped_early = True
            log(f"time cap of {cfg.minutes} min reached after {step} steps")
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        batch = _random_batch(corpus.train_ids, cfg, gen)
        ce, aux, grad_norm = _train_step(model, opt, batch, cfg)
        history.append({"step": step + 1, "ce": ce, "aux": aux, "grad_norm": grad_norm})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            held = perplexity(model, monitor_wins)["nll"]
            held_curve.append((step + 1, held))
            log(f"step {step + 1}/{cfg.steps}: train CE {ce:.3f}, aux {aux:.3f}, "
                f"held-out CE {held:.3f} ({time.perf_counter() - t_train:.0f}s)")
        bar.set_postfix(ce=f"{ce:.3f}", aux=f"{aux:.3f}", refresh=False)
    bar.close()
    train_wall = time.perf_counter() - t_train
    tail = history[-min(50, len(history)):]
    return _Trained(history=history, held_curve=held_curve, stopped_early=stopped_early,
                    wall_s=train_wall, final_train_loss=sum(h["ce"] for h in tail) / len(tail))


def _save_checkpoint(model: torch.nn.Module, corpus: _Corpus, out: pathlib.Path) -> None:
    """Write model, tokenizer and the held-out slice's token ids into `out`.

    Args:
        model: the trained model (its config is switched to plain inference).
        corpus: the run's `_Corpus` (tokenizer, slice windows).
        out: the checkpoint directory.
    """
    from safetensors.torch import save_file

    # Users load it for inference: router logits off by default, greedy generation; fp32 weights.
    model.config.output_router_logits = False
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    corpus.tokenizer.save_pretrained(out)
    save_file({"input_ids": corpus.slice_wins.to(torch.int32).contiguous()},
              str(out / "heldout_slice.safetensors"))


def _evaluate_checkpoint(out: pathlib.Path, corpus: _Corpus, cfg: TrainConfig,
                         log) -> _Evaluation:
    """Perplexity, routing statistics and a greedy sample of the checkpoint in `out`.

    The card describes what was stored, so the checkpoint is reloaded the way users load it
    rather than measured in memory.

    Args:
        out: the checkpoint directory.
        corpus: the run's `_Corpus` (held-out and slice windows).
        cfg: the run's config (block).
        log: callable taking one line of progress text.

    Returns:
        The `_Evaluation`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    t0 = time.perf_counter()
    ppl_full, routing_full = evaluate(reloaded, corpus.held_wins, block=cfg.block)
    ppl_slice, routing_slice = evaluate(reloaded, corpus.slice_wins, block=cfg.block)
    log(f"evaluation: {time.perf_counter() - t0:.0f}s")
    sample_ids = tok(SAMPLE_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        gen_ids = reloaded.generate(sample_ids, max_new_tokens=96, do_sample=False)
    sample = tok.decode(gen_ids[0], skip_special_tokens=False)
    log(f"held-out perplexity {ppl_full['perplexity']:.3f} ({ppl_full['predicted_tokens']:,} "
        f"tokens), EOR {routing_full.eor:.3f}, "
        f"distinct/{cfg.block} {routing_full.distinct_mean:.2f}")
    return _Evaluation(model=reloaded, ppl_full=ppl_full, ppl_slice=ppl_slice,
                       routing_full=routing_full, routing_slice=routing_slice, sample=sample)


def _card_dict(cfg: TrainConfig, corpus: _Corpus, n_params: int, trained: _Trained,
               evaluation: _Evaluation, total_wall: float) -> dict:
    """The card's figures and provenance, as written to card.json.

    Args:
        cfg: the run's config.
        corpus: the run's `_Corpus`.
        n_params: the model's parameter count.
        trained: the training loop's record.
        evaluation: the saved checkpoint's figures.
        total_wall: seconds from the start of the run to the end of evaluation.

    Returns:
        The card dict `render_card` renders.
    """
    import tokenizers
    import transformers

    # Per-token active parameters: everything but the experts, plus K of E experts per layer.
    expert_params = 3 * cfg.hidden * cfg.moe_intermediate
    active = n_params - cfg.layers * (cfg.experts - cfg.top_k) * expert_params
    source = "python-stdlib" if cfg.data is None else str(cfg.data)
    config_dict = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}
    config_dict["data"] = None if cfg.data is None else str(cfg.data)
    return {
        "name": cfg.name,
        "summary": (f"held-out ppl {evaluation.ppl_full['perplexity']:.2f}, "
                    f"EOR {evaluation.routing_full.eor:.3f}, {trained.steps_done} steps"),
        "architecture": {
            "model_type": evaluation.model.config.model_type,
            "class": type(evaluation.model).__name__,
            "layers": cfg.layers, "experts": cfg.experts, "top_k": cfg.top_k,
            "hidden": cfg.hidden, "moe_intermediate": cfg.moe_intermediate,
            "heads": cfg.heads, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "vocab": cfg.vocab, "norm_topk_prob": cfg.norm_topk_prob,
            "tie_word_embeddings": True, "shared_expert": False,
            "parameters": n_params, "active_parameters_per_token": active,
            "dtype": "float32", "trained_context": cfg.seq_len,
        },
        "data": {
            "source": source,
            "python": platform.python_version(),
            "suffixes": cfg.suffixes or ([".py"] if cfg.data is None
                                         else list(zdata.DEFAULT_TEXT_SUFFIXES)),
            "skipped_dirs": sorted(zdata.ALWAYS_SKIP_DIRS | (zdata.STDLIB_SKIP_DIRS
                                                             if cfg.data is None else set())),
            "files": len(corpus.files), "train_files": len(corpus.train_files),
            "held_out_files": len(corpus.held_files),
            "held_out_fraction": cfg.held_out_fraction, "split_seed": cfg.seed,
            "train_tokens": int(corpus.train_ids.numel()),
            "held_out_tokens": int(corpus.held_ids.numel()),
            "held_out_names": [f.name for f in corpus.held_files],
        },
        "training": {
            "steps": trained.steps_done, "steps_planned": cfg.steps,
            "stopped_early": trained.stopped_early,
            "batch": cfg.batch, "seq_len": cfg.seq_len,
            "tokens_seen": trained.steps_done * cfg.batch * cfg.seq_len,
            "epochs": trained.steps_done * cfg.batch * cfg.seq_len / corpus.train_ids.numel(),
            "optimizer": f"AdamW(betas=(0.9, 0.95), weight_decay={cfg.weight_decay} on matrices)",
            "lr": cfg.lr, "warmup": cfg.warmup,
            "schedule": f"linear warm-up, cosine to {cfg.min_lr_ratio} x lr",
            "grad_clip": cfg.grad_clip, "aux_coef": cfg.aux_coef, "seed": cfg.seed,
            "balance": "the Switch/Mixtral load-balancing loss computed for each MoE layer "
                       "separately and averaged over layers (transformers' built-in version "
                       "pools all layers' tokens, which lets a single layer leave experts idle)",
            "threads": torch.get_num_threads(),
            "train_wall_s": round(trained.wall_s, 1), "total_wall_s": round(total_wall, 1),
            "final_train_loss": trained.final_train_loss,
            "final_train_loss_definition": "mean cross-entropy (nats/token, aux loss excluded) "
                                           "of the last 50 training batches",
        },
        "eval": {
            "perplexity_held_out": evaluation.ppl_full,
            "perplexity_slice": evaluation.ppl_slice,
            "routing_held_out": evaluation.routing_full.to_dict(),
            "routing_slice": evaluation.routing_slice.to_dict(),
            "max_share_bound": MAX_SHARE_FACTOR / cfg.experts,
            "slice_file": "heldout_slice.safetensors",
        },
        "sample": {"prompt": SAMPLE_PROMPT, "decoding": "greedy", "max_new_tokens": 96,
                   "text": evaluation.sample},
        "command": command_for(cfg),
        "config": config_dict,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "machine": platform.machine()},
    }



def plot_loss(history: list[dict], held_curve: list[tuple[int, float]], path: pathlib.Path,
              title: str = "") -> None:
    """Write the loss curve: per-step train CE, its moving average, and held-out CE points.

    Args:
        history: per-step dicts with "step" and "ce".
        held_curve: (step, held-out CE) points.
        path: PNG file to write.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    ce = [h["ce"] for h in history]
    avg, acc = [], 0.0
    for i, v in enumerate(ce):
        acc = v if i == 0 else 0.98 * acc + 0.02 * v
        avg.append(acc)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, ce, color="tab:blue", alpha=0.25, linewidth=0.6, label="train CE (per step)")
    ax.plot(steps, avg, color="tab:blue", linewidth=1.5, label="train CE (EMA 0.98)")
    if held_curve:
        ax.plot(*zip(*held_curve, strict=True), "o-", color="tab:orange", markersize=3,
                label="held-out CE (first 16 windows)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_card(card: dict) -> str:
    """The MODEL_CARD.md text for a card dict: every figure comes from the dict.

    Args:
        card: as written to card.json.

    Returns:
        Markdown text.
    """
    sections = (_card_intro, _card_architecture, _card_data, _card_training, _card_evaluation,
                _card_sample, _card_reproduce)
    return "\n".join(section(card) for section in sections)


def _floats(xs: list[float], fmt: str = ".3f") -> str:
    return ", ".join(format(x, fmt) for x in xs)


def _source_phrase(d: dict) -> str:
    """The corpus, as the card's prose names it (`d` is the card's "data" section)."""
    return ("the Python standard library's sources" if d["source"] == "python-stdlib"
            else f"the text files under `{d['source']}`")


def _card_intro(card: dict) -> str:
    """Title, what the model is for, and how to load it."""
    src = _source_phrase(card["data"])
    return f"""# {card['name']}: a small Qwen3-MoE trained by remoe-engine

A fine-grained Mixture-of-Experts causal LM trained from scratch on {src}, shipped so that
routing experiments, tests and benchmarks have a genuinely trained router without a model hub.
It is a toy language model: useful for routing and caching behaviour, not for writing code.

Load it with plain transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
import remoe_engine.zoo
model = AutoModelForCausalLM.from_pretrained(remoe_engine.zoo.path("{card['name']}"))
tokenizer = AutoTokenizer.from_pretrained(remoe_engine.zoo.path("{card['name']}"))
```
"""


def _card_architecture(card: dict) -> str:
    """The model's shape and parameter counts."""
    a, t = card["architecture"], card["training"]
    return f"""## Architecture

- `{a['class']}` (`model_type` `{a['model_type']}`), {a['layers']} decoder layers, every one an
  MoE layer with {a['experts']} routed experts, top-{a['top_k']}, no shared expert.
- Hidden size {a['hidden']}, expert intermediate size {a['moe_intermediate']}, {a['heads']}
  attention heads of dim {a['head_dim']} ({a['kv_heads']} key/value heads), RMSNorm, RoPE,
  tied input/output embeddings, vocabulary {a['vocab']} (byte-level BPE).
- `norm_topk_prob = {a['norm_topk_prob']}`: the top-{a['top_k']} softmax weights are
  {'renormalised to sum to 1, as in Qwen3-MoE releases' if a['norm_topk_prob']
   else 'used as they are (not renormalised)'}.
- {a['parameters']:,} parameters, {a['active_parameters_per_token']:,} active per token;
  stored in {a['dtype']}. Trained context {a['trained_context']} tokens.
- The saved config has `output_router_logits = false` (plain inference);
  `router_aux_loss_coef = {t['aux_coef']}` is kept for anyone who trains further.
"""


def _card_data(card: dict) -> str:
    """The corpus, the held-out split rule and the token counts."""
    d = card["data"]
    src = _source_phrase(d)
    return f"""## Data

- Source: {src} (`sysconfig.get_paths()["stdlib"]` when no `--data` is given), Python
  {d['python']}: files ending in {', '.join(d['suffixes'])}, skipping directories named
  {', '.join(f'`{s}`' for s in d['skipped_dirs'])} (test suites would dominate the corpus;
  site-packages is not the standard library).
- {d['files']} files; held-out split by file: a file is held out when the SHA-256 of
  `"{{seed}}:{{relative path}}"` falls in the lowest {d['held_out_fraction']} of the hash range
  (seed {d['split_seed']}), so membership depends only on the file's name. {d['train_files']}
  training files ({d['train_tokens']:,} tokens), {d['held_out_files']} held-out files
  ({d['held_out_tokens']:,} tokens); the names are listed in `card.json`.
- The tokenizer was trained on the training files only. Each file is followed by `<|endoftext|>`.
"""


def _card_training(card: dict) -> str:
    """Schedule, optimizer, balance loss, wall time, the final train loss."""
    a, t = card["architecture"], card["training"]
    return f"""## Training

- {t['steps']} steps{' (stopped early by the time cap)' if t['stopped_early'] else ''} of
  {t['batch']} x {t['seq_len']} tokens, uniformly random windows of the training stream
  ({t['tokens_seen']:,} tokens, {t['epochs']:.2f} epochs).
- {t['optimizer']}, lr {t['lr']}, {t['warmup']} warm-up steps,
  {t['schedule']}, gradient clipping {t['grad_clip']}. Seed {t['seed']}.
- Load balancing: {t.get('balance', 'the standard load-balancing loss')}; coefficient
  {t['aux_coef']} (the loss is {a['top_k']} when routing is perfectly balanced).
- Wall time: {t['train_wall_s'] / 60:.1f} min training, {t['total_wall_s'] / 60:.1f} min in all
  (tokenizer, training, evaluation), {t['threads']} CPU thread{'s' if t['threads'] != 1 else ''}
  ({card['versions']['machine']}, torch {card['versions']['torch']}, transformers
  {card['versions']['transformers']}), on a machine shared with other jobs.
- Final train loss: **{t['final_train_loss']:.4f}** ({t['final_train_loss_definition']}).

![loss curve](loss_curve.png)
"""


def _card_evaluation(card: dict) -> str:
    """Held-out and slice perplexity, and the routing statistics."""
    a, e = card["architecture"], card["eval"]
    pf, ps = e["perplexity_held_out"], e["perplexity_slice"]
    rf, rs = e["routing_held_out"], e["routing_slice"]
    return f"""## Evaluation (of the stored weights, loaded with `from_pretrained`)

Windows: the held-out files, sorted by name, each tokenized and followed by `<|endoftext|>`,
concatenated and cut into consecutive non-overlapping windows of {pf['seq_len']} tokens (the
trailing partial window dropped); each window is an independent sequence.

- **Held-out perplexity: {pf['perplexity']:.4f}** = exp(mean NLL) over every predicted token
  (positions 2..{pf['seq_len']} of each window): {pf['windows']} windows,
  {pf['predicted_tokens']:,} predicted tokens.
- Slice perplexity: {ps['perplexity']:.4f} on the first {ps['windows']} windows
  ({ps['predicted_tokens']:,} predicted tokens). Its token ids ship as `{e['slice_file']}`, so
  `tests/test_zoo.py` recomputes it on any Python and holds it to this card within 1%.

Routing (batch size 1 semantics: consecutive tokens of one window; top-{a['top_k']} of the
router softmax, per MoE layer), on all held-out windows ({rf['tokens']:,} tokens), with the
slice figures in brackets:

- **EOR** (expert overlap between consecutive tokens, `IR_t = |E_t ∩ E_(t-1)| / K`, averaged over
  tokens, then layers): **{rf['eor']:.4f}** [{rs['eor']:.4f}]; per layer
  {_floats(rf['eor_per_layer'])}. Routing that ignores the previous token gives K/E =
  {rf['eor_random']:.4f}.
- **Distinct experts per window of {rf['distinct_block']} tokens** (per layer, non-overlapping
  blocks inside each window): mean **{rf['distinct_mean']:.2f}** [{rs['distinct_mean']:.2f}] of
  {a['experts']}; per layer {_floats(rf['distinct_per_layer'], '.2f')}. Uniformly random top-K
  sets would give {rf['distinct_random']:.2f}.
- **Expert usage share** (share of a layer's top-K selections): min {rf['share_min']:.4f},
  max {rf['share_max']:.4f} [min {rs['share_min']:.4f}, max {rs['share_max']:.4f}]; uniform is
  {1 / a['experts']:.4f}; largest share per layer {_floats(rf['share_max_per_layer'], '.4f')}.
  Unused (layer, expert) pairs: {len(rf['unused_experts'])}
  [{len(rs['unused_experts'])}]. Stated bound, checked by the tests: no expert above
  {e['max_share_bound']:.4f} ({e['max_share_bound'] * a['experts']:.0f}x uniform) of its
  layer's selections, and every expert used.
"""


def _card_sample(card: dict) -> str:
    """The greedy sample."""
    return f"""## Sample

Greedy decoding, {card['sample']['max_new_tokens']} new tokens, prompt
`{card['sample']['prompt']!r}`:

```text
{card['sample']['text']}
```
"""


def _card_reproduce(card: dict) -> str:
    """The command that retrains it, and how far a rerun matches."""
    return f"""## Reproduce

```bash
{card['command']}
```

Every random choice is seeded (split, initialisation, batches); a rerun on the same machine and
thread count gives the same weights. Other CPUs or thread counts change float rounding, and another
Python's standard library changes the corpus, so the figures move slightly there.
"""
