"""Downstream multiple-choice tasks evaluated in the training loop (eval.tasks).

Each choice is scored by the model's log-likelihood of its tokens after the example's context and a delimiter (a
space by default), the way lm-evaluation-harness and llm-foundry's in-context-learning evaluation score multiple
choice: the predicted answer is the choice of the highest summed log-likelihood (`acc`), or of the highest
log-likelihood per character of the choice as written (`acc_norm`, which does not favour short choices). A context
starts after an end-of-document token, as a document of the packed training data does (under document masking, at
position 0 of its own document, as there); a context longer than train.seq_len keeps its end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from qwen2_dist.errors import UserError
from qwen2_dist.model.loss import IGNORE_INDEX

TASK_FORMAT = ('one JSON object per line, {"context": "The capital of France is", "choices": ["Paris", "Rome"], '
               '"answer": 0} (llm-foundry\'s multiple-choice keys "query" and "gold" are read as context and answer)')

ROW_ALIGN = 128
"""On the CPU, rows are padded to the task's longest row rounded up to this (at most train.seq_len), not to
train.seq_len: a short task costs short forwards."""


@dataclass
class Task:
    """One task's rows: one per (example, choice), each the end-of-document token (see build_task), the context, the
    delimiter and the choice."""

    name: str
    path: str
    tokens: list[np.ndarray]
    """Each row's token ids (int64, at most train.seq_len + 1)."""
    scored: np.ndarray
    """Each row's count of scored tokens: its last ones, the choice's."""
    example: np.ndarray
    """The example each row belongs to."""
    chars: np.ndarray
    """The length of each row's choice in characters (acc_norm's divisor)."""
    answers: np.ndarray
    """Each example's correct choice."""
    length: int
    """The padded length of every row's input."""
    pad_id: int
    """The token id of the padding (the end-of-document token; its positions are never scored)."""
    cut: int = 0
    """Examples whose context lost its start to fit train.seq_len."""

    @property
    def examples(self) -> int:
        return len(self.answers)


def _example(line: str, where: str) -> tuple[str, list[str], int]:
    """(context, choices, answer) of one JSONL line; UserError naming the file and line otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not JSON ({exc.msg}); write {TASK_FORMAT}") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: a JSON {type(record).__name__}, not an object; write {TASK_FORMAT}")
    context = record.get("context", record.get("query"))
    answer = record.get("answer", record.get("gold"))
    choices = record.get("choices")
    if not isinstance(context, str):
        raise UserError(f"{where}: no \"context\" string; write {TASK_FORMAT}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise UserError(f"{where}: \"choices\" must be a list of at least two non-empty strings; write {TASK_FORMAT}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise UserError(f"{where}: \"answer\" must be the index of the correct choice, 0 to {len(choices) - 1}; "
                        f"got {answer!r}")
    for text in (context, *choices):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # A JSON escape of half a UTF-16 pair (\ud800): the qwen2 tokenizer would score U+FFFD in its place, and
            # qwen2-prepare skips such records (not_utf8).
            raise UserError(f"{where}: {text[exc.start]!r}, half of a UTF-16 surrogate pair, is no character; "
                            "write the whole pair or the character itself") from None
    return context, choices, answer


def read_examples(path: str, field: str, limit: int | None = None) -> list[tuple[int, str, list[str], int]]:
    """The first `limit` examples (None: all) of a task file, as (line number, context, choices, answer); UserError
    naming `field`, the file and the line for a file that cannot be read or a line that is not an example."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{field}={path}: cannot read it ({exc}); point it to a JSONL file of {TASK_FORMAT}") from None
    if not lines:
        raise UserError(f"{field}={path}: no example in it; write {TASK_FORMAT}")
    return [(n, *_example(line, f"{field}={path}, line {n}")) for n, line in lines[:limit]]


def split_context(context: str, choice: str) -> tuple[str, str]:
    """The context without its trailing whitespace, which goes to the choice instead (' Paris' is one token, where
    'capital: ' + 'Paris' would end the context on a lone space the model rarely sees before a word)."""
    kept = context.rstrip()
    return kept, context[len(kept):] + choice


def build_task(name: str, path: str, field: str, tokenizer, seq_len: int, limit: int | None = None,
               tp: int = 1, full_length: bool = False, delimiter: str = " ", document_start: bool = True) -> Task:
    """A task's rows from its file, tokenized by the training data's tokenizer: the end-of-document token (unless
    document_start is False and the context is not empty), the context, the delimiter and the choice. A choice of
    more than seq_len tokens is refused (its file line named); a longer context keeps its last tokens, and the task
    counts those examples. Rows are padded to seq_len with full_length (compiled blocks, FlexAttention and cuDNN's
    attention are specialised to the training shape; another shape would recompile the blocks for dynamic shapes,
    which the training steps would then run), else to the longest row rounded up to ROW_ALIGN, a multiple of tp
    (sequence parallelism splits it) or else seq_len."""
    examples = read_examples(path, field, limit)
    tokens, scored, example, chars, answers, cut = [], [], [], [], [], 0
    for index, (line, context, choices, answer) in enumerate(examples):
        was_cut = False
        for choice in choices:
            if delimiter and (choice[:1].isspace() or context[-1:].isspace()):
                raise UserError(f"{field}={path}, line {line}: " + (
                    f"the choice {choice!r} starts" if choice[:1].isspace() else "the context ends")
                    + f" with whitespace, and the delimiter {delimiter!r} would add more; set "
                    f"{field.rsplit('.', 1)[0]}.delimiter='' for examples that carry their own spaces")
            kept, continuation = split_context(context, delimiter + choice)
            head = tokenizer.encode(kept) if kept else []
            whole = tokenizer.encode(kept + continuation)
            # Tokens of the choice: those after the context's where its tokens start the whole text's (lm-eval's
            # split); else, where the join merged across the boundary, the continuation on its own.
            tail = whole[len(head):] if whole[:len(head)] == head and len(whole) > len(head) \
                else tokenizer.encode(continuation)
            if len(tail) > seq_len:
                raise UserError(f"{field}={path}, line {line}: a choice of {len(tail)} tokens, more than "
                                f"train.seq_len={seq_len}; shorten it or leave the example out")
            row = ([tokenizer.eos_id] if document_start or not head else []) + head + tail
            if len(row) > seq_len + 1:
                row, was_cut = row[-(seq_len + 1):], True
            tokens.append(np.asarray(row, dtype=np.int64))
            scored.append(len(tail))
            example.append(index)
            chars.append(len(choice))  # lm-eval's acc_norm divisor: the choice as written, not the delimiter
        cut += was_cut
        answers.append(answer)
    longest = max(len(row) - 1 for row in tokens)
    length = min(seq_len, math.ceil(longest / ROW_ALIGN) * ROW_ALIGN)
    if length % tp or full_length:
        length = seq_len
    return Task(name, path, tokens, np.asarray(scored), np.asarray(example), np.asarray(chars, dtype=np.float64),
                np.asarray(answers), length, tokenizer.eos_id, cut)


def summaries_tokenizer(summaries: list[dict]) -> str | None:
    """The tokenizer the training data's prepare summaries name (tokenizer=qwen2, or a Hugging Face tokenizer's
    directory or hub id as given to qwen2-prepare); None when they name none, or several."""
    names = {summary.get("tokenizer") for summary in summaries}
    (name,) = names if len(names) == 1 else (None,)
    return name if isinstance(name, str) else None


def load_tasks(job, tokenizer_name: str | None, vocab_size: int, tp: int = 1, full_length: bool = False,
               log=None) -> list[Task]:
    """eval.tasks of a job (JobConfig) as rows, tokenized by the tokenizer the training data was prepared with
    (UserError naming the task when there is none, or when its ids do not fit model.vocab_size); full_length: padded
    to train.seq_len (build_task). Run by the launchers' check (config.check_saved) and by the job. log: a logger
    told what each task holds."""
    from qwen2_dist.config import eval_task_names
    from qwen2_dist.data.tokenizer import load_tokenizer

    if not job.eval.tasks:
        return []
    if tokenizer_name is None:
        raise UserError("eval.tasks: the training data names no tokenizer to tokenize the tasks with (its sources name "
                        "different ones, or none); prepare it again with qwen2-prepare, or drop eval.tasks")
    tokenizer = load_tokenizer(tokenizer_name)
    tasks = []
    for i, (spec, name) in enumerate(zip(job.eval.tasks, eval_task_names(job.eval))):
        task = build_task(name, spec.path, f"eval.tasks[{i}].path", tokenizer, job.train.seq_len, spec.limit, tp,
                          full_length, spec.delimiter, document_start=not job.data.document_masking)
        largest = max(int(row.max()) for row in task.tokens)
        if largest >= vocab_size:
            raise UserError(f"eval.tasks[{i}].path={spec.path}: the training data's tokenizer {tokenizer_name} gives "
                            f"it token id {largest}, beyond model.vocab_size={vocab_size}; the model must hold the "
                            f"tokenizer's {tokenizer.vocab_size} ids (model.vocab_size={tokenizer.vocab_size})")
        if log is not None:
            log.info("eval.tasks: %s, %d examples (%d choices) from %s, scored in rows of %d tokens%s", name,
                     task.examples, len(task.tokens), spec.path, task.length,
                     f"; {task.cut} contexts cut to their last train.seq_len tokens" if task.cut else "")
        tasks.append(task)
    return tasks


def rows_of(task: Task, micro: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> list[int]:
    """The row indices one data-parallel rank evaluates in micro-batch `micro` (-1: padding, past the last row):
    each micro-batch takes the next micro_batch_size x dp_size rows, rank by rank."""
    start = (micro * dp_size + dp_rank) * micro_batch_size
    return [i if i < len(task.tokens) else -1 for i in range(start, start + micro_batch_size)]


def micro_batches(task: Task, micro_batch_size: int, dp_size: int) -> int:
    """Micro-batches every rank runs for a task (the same count on each: FSDP's and TP's collectives need them)."""
    return math.ceil(len(task.tokens) / (micro_batch_size * dp_size))


def batch(task: Task, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (micro_batch_size, task.length) of the rows: targets are the choice's tokens, every other
    position IGNORE_INDEX (a padding row, -1, has none)."""
    inputs = torch.full((len(rows), task.length), task.pad_id, dtype=torch.long)
    targets = torch.full((len(rows), task.length), IGNORE_INDEX, dtype=torch.long)
    for slot, row in enumerate(rows):
        if row < 0:
            continue
        ids = torch.from_numpy(task.tokens[row])
        n = len(ids) - 1
        inputs[slot, :n] = ids[:-1]
        k = int(task.scored[row])
        targets[slot, n - k:n] = ids[-k:]
    return inputs, targets


def accuracies(task: Task, log_likelihood: np.ndarray) -> tuple[float, float]:
    """acc and acc_norm of a task from each row's summed log-likelihood of its choice (ties: the first choice)."""
    correct = correct_norm = 0
    bounds = np.flatnonzero(np.diff(task.example, prepend=-1, append=task.examples + 1))
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        scores = log_likelihood[start:end]
        correct += int(np.argmax(scores)) == task.answers[index]
        correct_norm += int(np.argmax(scores / task.chars[start:end])) == task.answers[index]
    return correct / task.examples, correct_norm / task.examples
