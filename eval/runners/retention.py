"""Knowledge retention (MemoryLLM paper, Sec. 4.3): inject a context, then k unrelated contexts, then ask.

For each sample: its context (cut to `--context-tokens`) goes into a fresh memory, then the first k contexts of one
fixed list of unrelated contexts (the same list for every sample), and the question is asked. Texts and questions
are framed by `serving.framing_for` (`--framing`): for chat models by default each text opens a user turn of the
chat template ("Context: ...", under the context-QA system turn `serving.CONTEXT_QA_SYSTEM`) and the question
closes the turn of the last text, with "Answer:" opening the reply; `raw` injects the bare text and asks with the
chat template (or the paper's `"Questions: {question} Answer:"`). Scored by greedy generation (gold answer as a
substring) and by the teacher-forced NLL of the gold answer. Baselines in the same run: the model with an empty
memory (no injection; the question as a plain chat turn), and with the context in the prompt (the same token ids as
the memory holds, then the question).

Where the variant writes each text on its own (`training-free-ranked`), the unrelated contexts' rows are computed
once per run and written into every sample's memory with its own drop (`shared.SharedTexts`). Questions about the
same context (SQuAD has several per paragraph) are batched together and share one memory of it, whose drop draws
are seeded by the context's number (`context_index`, its place in the seed's fixed order of all contexts), so a
batched run equals an unbatched one, and a question's outputs do not depend on which other questions a run holds.
"""

import dataclasses
import random

from modeling_memoryllm.serving import FRAMINGS, Framing, chat_prompt, framing_for

from .. import data
from . import common
from .benchmark import Benchmark, CardEntry, Run
from .shared import SharedTexts


ANSWER_PREFIX = "Answer:"
DEFAULT_MAX_ANSWER_TOKENS = {"squad": 3, "nq": 4}  # the paper keeps answers of at most 3 (SQuAD) / 4 (NQ) tokens
UNRELATED_RESERVE = 20  # contexts set aside as unrelated ones (the paper's largest k), whatever --ks asks for
CARD_DATASETS = {  # benchmark -> (dataset type on the Hub, display name)
    "retention-squad": ("rajpurkar/squad_v2", "SQuAD v2 dev, answerable (knowledge retention)"),
    "retention-nq": ("google-research-datasets/nq_open", "NQ-open with gold passages (knowledge retention)"),
}


# ------------------------------------------------------------------------------------------------------- samples
def answer_ids(subject: common.Subject, answer: str) -> list[int]:
    return subject.encode(" " + answer, special=False)


def select(records: list[dict], subject: common.Subject, args) -> tuple[list[dict], list[str]]:
    """The fixed unrelated contexts, then `--limit` samples with short gold answers whose context is not one of them.

    Both orders are fixed by the seed alone: the first `max(UNRELATED_RESERVE, max k)` contexts of a shuffled list
    are set aside, so `--limit n` takes the first n samples of the same order whatever the limit or `--ks`. A
    context's number (`context_index`, which seeds its memory's draws) is its place in that list, so a question gets
    the same draws whatever the other questions of the run (`--max-answer-tokens`, `--limit`, `--offset`).
    """
    contexts = list(dict.fromkeys(record["context"] for record in records))
    random.Random(args.seed + 1).shuffle(contexts)
    needed = max(args.ks, default=0)
    reserved = set(contexts[: max(UNRELATED_RESERVE, needed)])
    if len(contexts) - len(reserved) < 1 or len(contexts) < needed:
        raise ValueError(f"{len(contexts)} distinct contexts are too few for k up to {needed}")
    eligible = [
        r
        for r in records
        if r["context"] not in reserved and len(answer_ids(subject, r["answers"][0])) <= args.max_answer_tokens
    ]
    random.Random(args.seed).shuffle(eligible)
    end = None if args.limit is None else args.offset + args.limit
    chosen = eligible[args.offset : end]  # a shard of the fixed order (`--offset`)
    numbers = {context: rank for rank, context in enumerate(contexts)}  # whatever the filter, limit or shard
    for record in chosen:
        record["context_index"] = numbers[record["context"]]
    return sorted(chosen, key=lambda r: r["context_index"]), contexts[:needed]  # a context's questions together


def framed_context(subject: common.Subject, text: str, args, frame: Framing, later=False) -> tuple[str, list[int]]:
    """`text` cut to `--context-tokens` tokens, and the token ids of it framed for injection (`later`: after other
    text, see `serving.continues_turn`)."""
    context = subject.decode(subject.encode(text, special=False)[: args.context_tokens])
    return context, subject.encode(frame.text(context, later=later), special=False)


def prepare(subject: common.Subject, records: list[dict], args, frame: Framing) -> list[dict]:
    """Token ids of each sample's framed context, question prompts (after the memory, and with none), in-context
    prompt and gold answer."""
    samples = []
    for index, record in enumerate(records, start=args.offset):
        context, context_ids = framed_context(subject, record["context"], args, frame)
        question = record["question"]
        prompt_ids = subject.encode(frame.question(question, ANSWER_PREFIX), special=frame.name != "chat")
        in_context = context_ids + prompt_ids  # exactly what the memory holds, then the question
        if frame.name == "raw":
            in_context = subject.encode(in_context_prompt(subject.tokenizer, context, question))
        samples.append(
            {
                "index": index,
                "context_index": record["context_index"],
                "id": record["id"],
                "question": question,
                "answers": record["answers"],
                "context_ids": context_ids,
                "prompt_ids": prompt_ids,
                "plain_prompt_ids": subject.encode(frame.question(question, ANSWER_PREFIX, after_text=False)),
                "in_context_ids": in_context,
                "answer_ids": answer_ids(subject, record["answers"][0]),
            }
        )
    return samples


def in_context_prompt(tokenizer, context: str, question: str) -> str:
    """The context in front of the question with `--framing raw`. For chat models "Context: ... Question: ..." in
    the user turn: on SQuAD part-a, SmolLM2-135M-Instruct ended its turn at once far less often with these labels
    than without."""
    if common.has_chat_template(tokenizer):
        return chat_prompt(tokenizer, f"Context: {context}\n\nQuestion: {question}")
    return f"{context}\n{chat_prompt(tokenizer, question)}"


# --------------------------------------------------------------------------------------------------------- asking
def is_retained(prediction: str, answers: list[str]) -> bool:
    """The metric's default rule: a stripped gold answer is a case-sensitive substring of the output."""
    return any(answer.strip() and answer.strip() in prediction for answer in answers)


def ask(subject, batch: list[dict], memory, args, prompt_key: str = "prompt_ids") -> list[dict]:
    """Generate an answer and score the gold answer's NLL for every sample of `batch`."""
    prompts = [sample[prompt_key] for sample in batch]
    predictions = common.generate(subject, prompts, memory, args.max_new_tokens)
    scores = common.continuation_scores(subject, prompts, [s["answer_ids"] for s in batch], memory)
    return [
        {"prediction": prediction, "correct": is_retained(prediction, sample["answers"]), "answer_nll": -mean_lp}
        for sample, prediction, mean_lp in zip(batch, predictions, [common.mean(lp) for lp, _ in scores])
    ]


def _compute(metric, outputs: list[tuple]) -> dict:
    return metric.compute(
        predictions=[output["prediction"] for _, _, output in outputs],
        references=[answers for _, answers, _ in outputs],
        num_unrelated=[k for k, _, _ in outputs],
        answer_nll=[output["answer_nll"] for _, _, output in outputs],
    )


# ---------------------------------------------------------------------------------------------------- benchmark
class Retention(Benchmark):
    name = "retention"

    def add_arguments(self, parser) -> None:
        parser.add_argument("--dataset", choices=("squad", "nq"), default="squad")
        parser.add_argument("--ks", type=common.int_list, default="0,1,2,5,10,20", help="numbers of unrelated contexts")
        parser.add_argument("--context-tokens", type=int, default=512, help="contexts are cut to this many tokens")
        parser.add_argument("--max-answer-tokens", type=int, help="keep answers this short (default 3 SQuAD / 4 NQ)")
        parser.add_argument("--max-new-tokens", type=int, default=10)
        parser.add_argument("--framing", choices=FRAMINGS, help="chat (default for chat models) or raw")
        parser.add_argument(
            "--offset", type=int, default=0, help="skip this many samples of the fixed order (a shard; `eval merge`)"
        )
        parser.add_argument(
            "--inject-each", action="store_true", help="inject the unrelated contexts into every memory (no sharing)"
        )

    def benchmark_id(self, args) -> str:
        return f"retention-{args.dataset}"

    def load(self, run: Run) -> list[dict]:
        """The samples, and the fixed unrelated contexts (token ids) in `run.shared["unrelated"]`."""
        subject, args = run.subject, run.args
        args.max_answer_tokens = args.max_answer_tokens or DEFAULT_MAX_ANSWER_TOKENS[args.dataset]
        frame = run.shared["frame"] = framing_for(subject.tokenizer, args.framing)
        args.framing = frame.name
        records = data.retention_records(args.dataset, args.split, args.data_dir)
        chosen, unrelated = select(records, subject, args)
        later = subject.is_memory and not getattr(subject.model.variant, "writes_texts_apart", False)
        run.shared["unrelated"] = [framed_context(subject, text, args, frame, later)[1] for text in unrelated]
        run.shared["unrelated_in_prompt"] = [framed_context(subject, text, args, frame, True)[1] for text in unrelated]
        if subject.is_memory:
            run.shared["texts"] = SharedTexts(subject.model, run.shared["unrelated"], share=not args.inject_each)
        return prepare(subject, chosen, args, frame)

    def run_memory(self, run: Run, batch: list[dict]) -> None:
        """Context into fresh memories, then unrelated contexts; ask at every k (outputs under `sample["memory"]`).
        The questions of one context share its memory: one injection, with drop draws seeded by the context's number
        (so a batched run equals an unbatched one)."""
        subject, args, texts = run.subject, run.args, run.shared["texts"]
        group_of = {}  # context ids -> the memory of that context in this batch
        memory_of = [group_of.setdefault(tuple(sample["context_ids"]), len(group_of)) for sample in batch]
        leaders = [batch[memory_of.index(group)] for group in range(len(group_of))]
        states = subject.new_states(len(leaders))
        generators = common.sample_generators(args.seed, [sample["context_index"] for sample in leaders])
        subject.inject([sample["context_ids"] for sample in leaders], states, generators)
        tracks, injected = [texts.track(state) for state in states], 0
        for k in args.ks:
            for index in range(injected, k):
                tracks, states = texts.inject(index, tracks, states, generators)
            injected = k
            memories = texts.states(tracks, states)
            for sample, output in zip(batch, ask(subject, batch, [memories[g] for g in memory_of], args)):
                sample.setdefault("memory", {})[str(k)] = output

    def run_baselines(self, run: Run, batch: list[dict]) -> None:
        subject, args = run.subject, run.args
        if "no_injection" in run.baselines:
            for sample, output in zip(batch, ask(subject, batch, None, args, "plain_prompt_ids")):
                sample["no_injection"] = output
        if "in_context" in run.baselines:
            fits = [s for s in batch if len(s["in_context_ids"]) + args.max_new_tokens <= subject.max_positions]
            outputs = ask(subject, fits, None, args, "in_context_ids") if fits else []
            by_index = {sample["index"]: output for sample, output in zip(fits, outputs)}
            for sample in batch:
                sample["in_context"] = by_index.get(sample["index"])  # None: the context does not fit
        if "texts_in_prompt" in run.baselines:
            self.texts_in_prompt(run, batch)

    def texts_in_prompt(self, run: Run, batch: list[dict]) -> None:
        """The baseline of the memory at every k: the context, then the first k unrelated contexts (each continuing
        the user turn, as one prompt holds them), then the question, all in the prompt; `None` where it does not
        fit."""
        subject, args, texts = run.subject, run.args, run.shared["unrelated_in_prompt"]
        for k in args.ks:
            rows = [s["context_ids"] + [t for text in texts[:k] for t in text] + s["prompt_ids"] for s in batch]
            fits = [i for i, row in enumerate(rows) if len(row) + args.max_new_tokens <= subject.max_positions]
            asked = [{**batch[i], "k_prompt_ids": rows[i]} for i in fits]
            outputs = dict(zip(fits, ask(subject, asked, None, args, "k_prompt_ids") if asked else []))
            for i, sample in enumerate(batch):
                sample.setdefault("texts_in_prompt", {})[str(k)] = outputs.get(i)

    def aggregate(self, run: Run, samples: list[dict]) -> dict:
        metric = common.load_metric("knowledge_retention")
        results = {}
        if samples and "memory" in samples[0]:
            outputs = [(k, s["answers"], s["memory"][str(k)]) for k in run.args.ks for s in samples]
            results["memory"] = _compute(metric, outputs)
        for name in run.baselines:
            if name == "texts_in_prompt":  # by k, as the memory
                by_k = [(k, s["answers"], s[name][str(k)]) for k in run.args.ks for s in samples]
                outputs = [output for output in by_k if output[2] is not None]
                results[name] = _compute(metric, outputs) if outputs else None
                continue
            outputs = [(0, s["answers"], s[name]) for s in samples if s.get(name) is not None]
            results[name] = _compute(metric, outputs) if outputs else None
        return results

    def public(self, run: Run, sample: dict) -> dict:
        hidden = ("context_ids", "prompt_ids", "plain_prompt_ids", "in_context_ids", "answer_ids")
        visible = {key: value for key, value in sample.items() if key not in hidden}
        return {**visible, "context_tokens": len(sample["context_ids"])}

    def config_extra(self, run: Run) -> dict:
        args = run.args
        source = str(data.data_file(args.dataset, args.split, args.data_dir))
        extra = {"data_file": source, "unrelated_context_tokens": [len(u) for u in run.shared["unrelated"]]}
        extra["framing_strings"] = dataclasses.asdict(run.shared["frame"])
        texts = run.shared.get("texts")
        if texts is not None:
            extra["unrelated_chunk_writes"] = dict(texts.counts)
        return extra

    def summary(self, results: dict) -> None:
        aggregates = results["aggregates"]
        memory = aggregates.get("memory")
        if memory:
            for k, accuracy in memory["accuracy_by_k"].items():
                print(f"memory k={k}: accuracy {accuracy:.3f}, NLL {memory['nll_by_k'].get(k, float('nan')):.3f}")
        for name in ("no_injection", "in_context"):
            if aggregates.get(name):
                print(f"{name}: accuracy {aggregates[name]['accuracy']:.3f}, NLL {aggregates[name]['mean_nll']:.3f}")
        texts = aggregates.get("texts_in_prompt")
        for k, accuracy in (texts or {}).get("accuracy_by_k", {}).items():
            print(f"texts_in_prompt k={k}: accuracy {accuracy:.3f}, NLL {texts['nll_by_k'].get(k, float('nan')):.3f}")

    def card_entries(self, results: dict, memory: dict) -> list[CardEntry]:
        config = results["config"]
        dataset_type, dataset_name = CARD_DATASETS[results["benchmark"]]
        fields = {
            "metric_args": {"samples": len(results["samples"])},
            "dataset_args": {"max_answer_tokens": config.get("max_answer_tokens")},  # which questions
            "dataset_type": dataset_type,
            "dataset_name": dataset_name,
        }
        name = "Retention accuracy after {} unrelated injections (%)"
        nll_name = "Gold-answer NLL after {} unrelated injections (nats/token, lower is better)"
        entries = [
            CardEntry("Knowledge retention", "accuracy", name.format(k), 100 * accuracy, fields)
            for k, accuracy in memory["accuracy_by_k"].items()
        ]
        return entries + [
            CardEntry("Knowledge retention", "nll", nll_name.format(k), nll, fields)
            for k, nll in memory.get("nll_by_k", {}).items()
            if nll is not None
        ]

    def plot(self, results: dict, path, title: str):
        """Accuracy and gold-answer NLL against k (memory), with the baselines as horizontal lines."""
        plt = common.pyplot()
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        aggregates = results["aggregates"]
        for axis, key, label in ((left, "accuracy", "accuracy"), (right, "nll", "gold-answer NLL (nats/token)")):
            for name, marker in (("memory", "o"), ("texts_in_prompt", "s")):  # curves by k
                curve = aggregates.get(name)
                if curve:
                    by_k = {int(k): value for k, value in curve[f"{key}_by_k"].items()}  # int keys, or str from JSON
                    axis.plot(sorted(by_k), [by_k[k] for k in sorted(by_k)], marker=marker, label=name)
            for name, style in (("no_injection", "--"), ("in_context", ":")):
                if aggregates.get(name):
                    value = aggregates[name]["accuracy" if key == "accuracy" else "mean_nll"]
                    axis.axhline(value, linestyle=style, color="gray" if style == "--" else "black", label=name)
            axis.set_xlabel("number of unrelated injections k")
            axis.set_ylabel(label)
            axis.legend()
        figure.suptitle(title)
        return common.save_figure(figure, path)


BENCHMARK = Retention()
main = BENCHMARK.main
