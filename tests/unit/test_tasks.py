"""eval.tasks: multiple-choice examples read, tokenized and scored by the model's log-likelihood of each choice."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qwen2_dist.data.tokenizer import load_tokenizer
from qwen2_dist.errors import UserError
from qwen2_dist.model.loss import IGNORE_INDEX
from qwen2_dist.train import tasks
from tests.helpers import cpu_trainer

EXAMPLES = [
    {"context": "The capital of France is", "choices": ["Paris", "Berlin", "a small town on the coast"], "answer": 0},
    {"query": "Water boils at a temperature of", "choices": ["100 degrees", "5 degrees"], "gold": 0},
    {"context": "Which is larger?", "choices": ["an elephant", "a mouse", "a cat", "an ant"], "answer": 1},
]


def write_task(path, examples=EXAMPLES) -> str:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples) + "\n")
    return str(path)


@pytest.mark.parametrize("line, words", [
    ("not json", "line 1: not JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"choices": ["a", "b"], "answer": 0}', 'no "context" string'),
    ('{"context": "c", "choices": ["a"], "answer": 0}', "at least two non-empty strings"),
    ('{"context": "c", "choices": ["a", ""], "answer": 0}', "at least two non-empty strings"),
    ('{"context": "c", "choices": ["a", "b"], "answer": 2}', '"answer" must be the index of the correct choice, 0 '
     'to 1'),
    ('{"context": "c", "choices": ["a", "b"], "answer": true}', "got True"),
    # Scored with U+FFFD in its place, where qwen2-prepare skips such a training record.
    ('{"context": "c", "choices": ["a\\ud800", "b"], "answer": 0}', "'\\ud800', half of a UTF-16 surrogate pair"),
])
def test_a_line_that_is_no_example_is_refused_with_the_file_and_line(tmp_path, line, words):
    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "c", "choices": ["a", "b"], "answer": 1}\n\n' + line + "\n")
    with pytest.raises(UserError, match="eval.tasks\\[0\\].path=") as exc:
        tasks.read_examples(str(path), "eval.tasks[0].path")
    assert words.replace("line 1", "line 3") in str(exc.value)
    assert "line 3" in str(exc.value)


def test_a_missing_or_empty_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="cannot read it"):
        tasks.read_examples(str(tmp_path / "none.jsonl"), "eval.tasks[0].path")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no example in it"):
        tasks.read_examples(str(tmp_path / "empty.jsonl"), "eval.tasks[0].path")


def test_rows_are_the_document_start_the_context_and_the_choice(tmp_path):
    tok = load_tokenizer("qwen2")
    task = tasks.build_task("t", write_task(tmp_path / "t.jsonl"), "eval.tasks[0].path", tok, seq_len=64)
    assert task.examples == 3 and len(task.tokens) == 3 + 2 + 4
    assert list(task.example) == [0, 0, 0, 1, 1, 2, 2, 2, 2] and list(task.answers) == [0, 0, 1]
    first = task.tokens[0].tolist()
    assert first == [tok.eos_id] + tok.encode("The capital of France is") + tok.encode(" Paris")
    assert task.scored[0] == len(tok.encode(" Paris"))
    assert task.scored[2] == len(tok.encode(" a small town on the coast"))
    assert tok.decode(task.tokens[3][-task.scored[3]:]) == " 100 degrees"
    assert tok.decode(task.tokens[3][1:-task.scored[3]]) == "Water boils at a temperature of"
    # acc_norm divides by the choice as written, as lm-evaluation-harness does, not by the delimiter too.
    assert task.chars[3] == len("100 degrees") and task.length == 64 and task.cut == 0
    # Choices that carry their own space (delimiter ''): a context's trailing space goes to the choice (' 100' is
    # one token); under document masking (document_start=False) a row starts with its context, unless that is empty.
    spaced = write_task(tmp_path / "s.jsonl", [{"context": "Water boils at ", "choices": ["100", "5"], "answer": 0},
                                               {"context": "", "choices": ["Yes", "No"], "answer": 0}])
    task = tasks.build_task("s", spaced, "f", tok, seq_len=64, delimiter="", document_start=False)
    assert task.tokens[0].tolist() == tok.encode("Water boils at") + tok.encode(" 100")
    assert task.tokens[2].tolist() == [tok.eos_id] + tok.encode("Yes") and task.chars[0] == 3
    # Padded to 128 tokens where train.seq_len is longer, unless the length must be the training one (CUDA) or
    # tensor parallelism does not divide 128.
    path = str(tmp_path / "t.jsonl")
    assert tasks.build_task("t", path, "f", tok, seq_len=512).length == 128
    assert tasks.build_task("t", path, "f", tok, seq_len=512, tp=2).length == 128
    assert tasks.build_task("t", path, "f", tok, seq_len=512, tp=3).length == 512
    assert tasks.build_task("t", path, "f", tok, seq_len=512, full_length=True).length == 512


def test_a_long_context_keeps_its_end_and_a_long_choice_is_refused(tmp_path):
    tok = load_tokenizer("qwen2")
    long = [{"context": "one two three four five six seven eight nine ten", "choices": ["eleven", "zero"],
             "answer": 0}, {"context": "Hi", "choices": ["a", "b"], "answer": 1}]
    task = tasks.build_task("t", write_task(tmp_path / "t.jsonl", long), "f", tok, seq_len=6)
    assert task.cut == 1 and all(len(row) <= 7 for row in task.tokens)
    assert task.tokens[0].tolist() == (tok.encode(long[0]["context"]) + tok.encode(" eleven"))[-7:]
    assert task.tokens[2][0] == tok.eos_id  # the second example fits
    too_long = [{"context": "x", "choices": ["a", "b"], "answer": 0},
                {"context": "x", "choices": ["a", "a b c d"], "answer": 0}]
    with pytest.raises(UserError, match="f=.*u.jsonl, line 2: a choice of 4 tokens, more than train.seq_len=3"):
        tasks.build_task("t", write_task(tmp_path / "u.jsonl", too_long), "f", tok, seq_len=3)


def test_tasks_that_the_job_cannot_score_are_refused_before_launch(tmp_path):
    """The launchers' check (config.check_saved) tokenizes the tasks as the job will: a choice longer than
    train.seq_len, ids beyond model.vocab_size, or training data naming no tokenizer is one line naming the task."""
    from qwen2_dist.cli.train import compose_job
    from qwen2_dist.config import check_saved

    path = write_task(tmp_path / "t.jsonl")
    job = compose_job(["model=tiny", f"run_dir={tmp_path / 'run'}", "train.seq_len=4",
                       f"eval.tasks=[{{path: {path}}}]"])
    with pytest.raises(UserError, match=r"eval.tasks\[0\].path=.*t.jsonl, line 1: a choice of 6 tokens, more than "
                                        r"train.seq_len=4"):
        check_saved(job)
    job.train.seq_len = 32
    check_saved(job)
    with pytest.raises(UserError, match=r"eval.tasks\[0\].path=.*t.jsonl: the training data's tokenizer qwen2 gives "
                                        r"it token id \d+, beyond model.vocab_size=1000; the model must hold the "
                                        r"tokenizer's 151646 ids \(model.vocab_size=151646\)"):
        tasks.load_tasks(job, "qwen2", vocab_size=1000)
    with pytest.raises(UserError, match="eval.tasks: the training data names no tokenizer"):
        tasks.load_tasks(job, None, vocab_size=151936)


def test_a_space_that_the_delimiter_would_double_is_refused(tmp_path):
    tok = load_tokenizer("qwen2")
    for example, words in (({"context": "Q:", "choices": ["a", " b"], "answer": 0}, "the choice ' b' starts"),
                           ({"context": "Q: ", "choices": ["a", "b"], "answer": 0}, "the context ends")):
        path = write_task(tmp_path / "t.jsonl", [EXAMPLES[0], example])
        with pytest.raises(UserError, match=f"eval.tasks\\[0\\].path=.*t.jsonl, line 2: {words} with whitespace, and "
                                            "the delimiter ' ' would add more; set eval.tasks\\[0\\].delimiter=''"):
            tasks.build_task("t", path, "eval.tasks[0].path", tok, seq_len=32)
        tasks.build_task("t", path, "eval.tasks[0].path", tok, seq_len=32, delimiter="")


def test_rows_are_dealt_to_ranks_and_padded():
    task = tasks.Task("t", "p", [np.arange(4), np.arange(3)] * 3 + [np.arange(5)], np.full(7, 2), np.arange(7),
                      np.ones(7), np.zeros(7, dtype=int), length=8, pad_id=9)
    assert tasks.micro_batches(task, 2, 2) == 2
    dealt = [tasks.rows_of(task, micro, 2, rank, 2) for micro in range(2) for rank in range(2)]
    assert dealt == [[0, 1], [2, 3], [4, 5], [6, -1]]
    inputs, targets = tasks.batch(task, [6, -1])
    assert inputs.tolist() == [[0, 1, 2, 3, 9, 9, 9, 9], [9] * 8]
    assert targets.tolist() == [[IGNORE_INDEX] * 2 + [3, 4] + [IGNORE_INDEX] * 4, [IGNORE_INDEX] * 8]


def test_accuracies_take_the_best_choice_summed_and_per_character():
    task = tasks.Task("t", "p", [np.arange(2)] * 5, np.ones(5), np.array([0, 0, 0, 1, 1]),
                      np.array([1.0, 10.0, 2.0, 1.0, 1.0]), np.array([1, 0]), length=2, pad_id=0)
    # Example 0 (answer 1): summed, choice 0 (-1.0) wins; per character, choice 1 (-1.5 / 10). Example 1: choice 0.
    acc, acc_norm = tasks.accuracies(task, np.array([-1.0, -1.5, -3.0, -0.5, -0.7]))
    assert (acc, acc_norm) == (0.5, 1.0)
    # Example 0: summed, choice 2 (-0.1); per character, choice 1 (-0.02). Example 1: choice 1, wrong.
    acc, acc_norm = tasks.accuracies(task, np.array([-1.0, -0.2, -0.1, -0.9, -0.7]))
    assert (acc, acc_norm) == (0.0, 0.5)


@pytest.mark.parametrize("loss, masking", [("chunked", "false"), ("plain", "false"), ("chunked", "true")])
def test_each_choice_is_scored_by_its_log_likelihood_after_the_context(tmp_path, loss, masking):
    """Each row's score is its choice tokens' log-probabilities from the full logits, summed (under document masking
    each row is one document from position 0, passed as training passes documents, and starts with its context);
    acc is the share of examples whose best-scored choice is the answer."""
    path = write_task(tmp_path / "t.jsonl")
    trainer = cpu_trainer(tmp_path, "train.seq_len=32", f"model.loss={loss}", "model.loss_chunk_tokens=7",
                          f"data.document_masking={masking}", f"eval.tasks=[{{path: {path}}}]", qwen2_vocab=True)
    (task,) = tasks.load_tasks(trainer.cfg, "qwen2", vocab_size=151936)
    assert (task.tokens[0][0] == task.pad_id) == (masking == "false")
    model, seen = trainer.model, []
    hidden_states = model.hidden_states
    model.hidden_states = lambda tokens, positions=None, mask_documents=False, tie=None: (
        seen.append((positions, mask_documents)), hidden_states(tokens, positions, mask_documents, tie))[1]
    scores = trainer.task_log_likelihoods(task)
    del model.hidden_states
    assert len(seen) == 5  # 9 rows in micro-batches of 2
    for positions, mask_documents in seen:
        assert mask_documents == (masking == "true")
        assert positions is None if masking == "false" else positions.tolist() == [list(range(task.length))] * 2
    with torch.no_grad():
        for row, ids in enumerate(task.tokens):
            ids = torch.as_tensor(ids)[None]
            logprobs = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]
            k = int(task.scored[row])
            expected = logprobs[-k:].gather(1, ids[0, -k:, None]).sum().item()
            assert scores[row] == pytest.approx(expected, abs=1e-4)
    trainer.tasks = [task]
    beats = []
    record, text = trainer.evaluate_all(beat=lambda: beats.append(1))
    assert beats == [1]  # the hang watchdog's limit is for each task
    best = [max(range(s, e), key=lambda r: scores[r]) - s for s, e in ((0, 3), (3, 5), (5, 9))]
    assert record["task_acc/t"] == pytest.approx(np.mean(np.array(best) == task.answers))
    assert "task_acc_norm/t" in record and "eval.tasks: t acc" in text and "on 3 examples" in text
