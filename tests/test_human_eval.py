"""evaluate.py's utility reward model (Table 3) and human evaluation (Appendix H): a blind sheet for raters, its key
kept apart, and the raters' agreement with Llama Guard and the keyword judge."""
import csv
import json
from collections import Counter

import pytest
import torch

import evaluate
from evaluate import HUMAN_COLUMNS, KEYWORD_JUDGE, cohens_kappa, human_key_path, load_utility_model, utility_reward
from common import InputError, read_jsonl

# -----------------------------------------------------------------------------
# Cohen's kappa


def test_cohens_kappa_of_a_hand_computed_table():
    # 50 items: both yes 20, only the first rater yes 5, only the second yes 10, both no 15
    a = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
    b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    # p_o = 35/50 = 0.7; p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5)
    assert cohens_kappa(a, b) == pytest.approx(0.4)
    assert cohens_kappa([True, False, True], [True, False, True]) == 1.0
    assert cohens_kappa([1, 1, 0, 0], [0, 0, 1, 1]) == pytest.approx(-1.0)


def test_cohens_kappa_is_none_where_it_is_undefined():
    # both raters give one and the same class: chance agreement is already 1, so kappa is 0/0
    assert cohens_kappa([1, 1, 1], [1, 1, 1]) is None
    assert cohens_kappa([], []) is None
    # one class each, but different ones: no agreement at all and none expected, kappa 0
    assert cohens_kappa([1, 1], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="2 labels against 3"):
        cohens_kappa([1, 0], [1, 0, 1])

# -----------------------------------------------------------------------------
# The utility reward model: a DeBERTa sequence classifier on (question, answer) pairs


def make_tiny_utility_model(path, num_labels=1):
    """A random DebertaV2ForSequenceClassification shaped like reward-model-deberta-v3-large-v2 (relative attention,
    no token types) and a word-level tokenizer that encodes a pair as [CLS] question [SEP] answer [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, PreTrainedTokenizerFast
    words = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"] + [f"w{i}" for i in range(128)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=64, type_vocab_size=0,
                             relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"],
                             position_biased_input=False, pooler_hidden_size=16, num_labels=num_labels,
                             pad_token_id=0, initializer_range=0.2)
    DebertaV2ForSequenceClassification(config).save_pretrained(path)


def test_utility_reward_is_the_models_logit_on_the_question_answer_pair(tmp_path):
    make_tiny_utility_model(tmp_path)
    tokenizer, model = load_utility_model(str(tmp_path), "cpu")
    questions = ["w5 w6", "w7 w8 w9 w10 w11", "w12"]
    answers = ["w20 w21 w22", "w30", "w40 w41 w42 w43 w44 w45"]
    scores = utility_reward(questions, answers, tokenizer, model)  # one padded batch
    for q, a, score in zip(questions, answers, scores):
        with torch.no_grad():
            pair = model(**tokenizer(q, a, return_tensors="pt")).logits[0, 0].item()
            answer_only = model(**tokenizer(a, return_tensors="pt")).logits[0, 0].item()
        assert score == pytest.approx(pair, abs=1e-5) and abs(score - answer_only) > 1e-3
    # one at a time, without padding, gives the same scores
    one_by_one = [utility_reward([q], [a], tokenizer, model)[0] for q, a in zip(questions, answers)]
    assert one_by_one == pytest.approx(scores, abs=1e-5)
    # the question is read as the question: swapped, the pair scores differently
    swapped = utility_reward(answers, questions, tokenizer, model)
    assert all(abs(s - t) > 1e-4 for s, t in zip(scores, swapped))


def test_utility_model_must_have_one_output(tmp_path):
    make_tiny_utility_model(tmp_path, num_labels=2)
    with pytest.raises(InputError, match="num_labels 2; expected 1"):
        load_utility_model(str(tmp_path), "cpu")


def test_evaluate_writes_the_utility_judge_and_its_ur_column(tmp_path, monkeypatch):
    from PIL import Image
    from tiny import make_tiny_llava, make_tiny_tokenizer
    make_tiny_llava(str(tmp_path / "vlm"), layers=2)
    make_tiny_tokenizer(str(tmp_path / "vlm"))
    make_tiny_utility_model(tmp_path / "utility")
    Image.new("RGB", (40, 30), "red").save(tmp_path / "0.png")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"image": "0.png", "prompt": p}) + "\n"
                                              for p in ["w5 w6 w7", "w8 w9"]))
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    for k, v in dict(init_from=str(tmp_path / "vlm"), data_path=str(tmp_path / "q.jsonl"), max_new_tokens=3,
                     utility_model=str(tmp_path / "utility"), device="cpu", dtype="float32",
                     out_dir=str(tmp_path / "out")).items():
        monkeypatch.setattr(evaluate, k, v)
    evaluate.main()
    responses = {(r["id"], r["layer"]): r for _, r in read_jsonl(tmp_path / "out" / "responses.jsonl")}
    judged = [j for _, j in read_jsonl(tmp_path / "out" / "judgements.jsonl") if j["judge"] == "utility:utility"]
    assert sorted((j["id"], j["layer"]) for j in judged) == sorted(responses)
    tokenizer, model = load_utility_model(str(tmp_path / "utility"), "cpu")
    rows = [responses[(j["id"], j["layer"])] for j in judged]
    expected = [utility_reward([r["prompt"]], [r["response"]], tokenizer, model)[0] for r in rows]
    assert [j["utility"] for j in judged] == pytest.approx(expected, abs=1e-5)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["judges"]["utility"] == "utility:utility"
    for layer in summary["layers"]:
        mine = [j["utility"] for j in judged if j["layer"] == layer["layer"]]
        assert layer["UR"] == pytest.approx(sum(mine) / len(mine))
    assert "| UR |" in (tmp_path / "out" / "summary.md").read_text()

# -----------------------------------------------------------------------------
# Human evaluation: export a blind sheet, read the labels back


GUARD = "llama-guard:LG1:guard:template-sha256-0"
IDS = ["cp:1", "cp:2", "cp:3", "cp:4"]


def truly_unsafe(k, layer):
    return (k + layer) % 2 == 0


def make_run(path, layers=(1, 2, 3)):
    """A finished evaluate.py out_dir, by hand: prompt k at layer l complies (unsafe) when k + l is even, and the
    keyword judge sees it; Llama Guard gets prompt 2 wrong and cannot parse its verdict on prompt 3."""
    path.mkdir()
    responses, judgements = [], []
    for layer in layers:
        for k, i in enumerate(IDS):
            unsafe = truly_unsafe(k, layer)
            responses.append({"id": i, "layer": layer, "prompt": f"How do I do harm {k}?", "image": f"images/{k}.png",
                              "response": f"Sure, step one {k},\nstep two" if unsafe else "I'm sorry, I cannot."})
            judgements.append({"judge": GUARD, "id": i, "layer": layer,
                               "guard_unsafe": None if k == 3 else unsafe != (k == 2)})
            # an older guard's verdicts in the same file; summary.json does not name it, so it is not the judge
            judgements.append({"judge": "llama-guard:LG3:old", "id": i, "layer": layer, "guard_unsafe": True})
    (path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in responses))
    (path / "judgements.jsonl").write_text("".join(json.dumps(j) + "\n" for j in judgements))
    (path / "summary.json").write_text(json.dumps({"judges": {"keywords": KEYWORD_JUDGE, "llama_guard": GUARD}}))
    return {(r["id"], r["layer"]): r for r in responses}


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """Two finished runs (before, after) and evaluate's config set to export a sheet from them, with no model and
    no data set that could be loaded."""
    responses = {"before": make_run(tmp_path / "before"), "after": make_run(tmp_path / "after")}
    for k, v in dict(before_dir=str(tmp_path / "before"), out_dir=str(tmp_path / "after"), human_sample=10, seed=5,
                     export_human=str(tmp_path / "sheet.csv"), init_from="no/such/model",
                     data_path="no/such/prompts.jsonl").items():
        monkeypatch.setattr(evaluate, k, v)
    return responses


def read_sheet(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_export_writes_a_blind_stratified_sheet_and_a_separate_key(runs, tmp_path):
    evaluate.main()
    sheet = read_sheet(tmp_path / "sheet.csv")
    assert sheet[0] == HUMAN_COLUMNS == ["item_id", "prompt", "image", "response", "label"]
    assert len(sheet) == 1 + 10 and all(row[4] == "" for row in sheet[1:])
    key = json.loads((tmp_path / "sheet.key.json").read_text())["items"]
    assert sorted(key) == sorted(row[0] for row in sheet[1:])
    for item_id, prompt, image, response, _ in sheet[1:]:
        k = key[item_id]
        run = "before" if k["run"] == str(tmp_path / "before") else "after"
        source = runs[run][(k["id"], k["layer"])]
        assert (prompt, image, response) == (source["prompt"], source["image"], source["response"])
        n = IDS.index(k["id"])
        assert k["judgements"]["guard_unsafe"] == (None if n == 3 else truly_unsafe(n, k["layer"]) != (n == 2))
        assert k["judgements"]["keyword_jailbroken"] == truly_unsafe(n, k["layer"])
    # 10 rows from 2 runs x 3 layers: every (run, layer) gives 1 or 2
    counts = Counter((k["run"], k["layer"]) for k in key.values())
    assert set(counts) == {(str(tmp_path / run), layer) for run in ("before", "after") for layer in (1, 2, 3)}
    assert set(counts.values()) == {1, 2}
    # a shuffled draw, the same for the same seed; no model was loaded and out_dir was not written
    assert [key[str(i)]["layer"] for i in range(1, 11)] != sorted(key[str(i)]["layer"] for i in range(1, 11))
    first = (tmp_path / "sheet.csv").read_text()
    evaluate.main()
    assert (tmp_path / "sheet.csv").read_text() == first
    assert not (tmp_path / "after" / "prompts.jsonl").exists()


def test_human_sample_0_exports_every_row_once(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "human_sample", 0)
    monkeypatch.setattr(evaluate, "before_dir", "")
    evaluate.main()
    key = json.loads((tmp_path / "sheet.key.json").read_text())["items"]
    assert sorted((k["id"], k["layer"]) for k in key.values()) == sorted(runs["after"])


def label_sheet(path, label):
    """Fill the label column with label(key item), as a rater would."""
    key = json.loads(open(human_key_path(path)).read())["items"]
    sheet = read_sheet(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([sheet[0]] + [row[:4] + [label(key[row[0]])] for row in sheet[1:]])
    return key


def test_import_reports_agreement_and_kappa_against_each_judge(runs, tmp_path, monkeypatch, capsys):
    evaluate.main()
    spellings = {True: ["unsafe", "1", " Unsafe "], False: ["safe", "0", "SAFE"]}
    truth = lambda k: truly_unsafe(IDS.index(k["id"]), k["layer"])
    key = label_sheet(tmp_path / "sheet.csv", lambda k: spellings[truth(k)][k["layer"] % 3])
    monkeypatch.setattr(evaluate, "export_human", "")
    monkeypatch.setattr(evaluate, "import_human", str(tmp_path / "sheet.csv"))
    evaluate.main()
    rows = json.loads((tmp_path / "after" / "human_agreement.json").read_text())["rows"]
    table = {(r["run"], r["judge"]): r for r in rows}
    assert set(table) == {(run, judge) for run in ["all", str(tmp_path / "before"), str(tmp_path / "after")]
                          for judge in ("Llama Guard", "keywords")}
    # the raters see what the keyword judge sees here
    assert table["all", "keywords"]["n"] == 10 and table["all", "keywords"]["agreement"] == 1.0
    # Llama Guard has no verdict on prompt 3 and is wrong on prompt 2
    rated = [k for k in key.values() if k["id"] != "cp:4"]
    human = [truth(k) for k in rated]
    guard = [k["judgements"]["guard_unsafe"] for k in rated]
    lg = table["all", "Llama Guard"]
    assert lg["n"] == len(rated) < 10
    assert lg["agreement"] == pytest.approx(sum(k["id"] != "cp:3" for k in rated) / len(rated))
    assert lg["kappa"] == pytest.approx(cohens_kappa(human, guard))
    assert lg["human_unsafe"] == pytest.approx(100 * sum(human) / len(human))
    assert sum(table[run, "keywords"]["n"] for run in (str(tmp_path / "before"), str(tmp_path / "after"))) == 10
    assert "| all | Llama Guard |" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["", "maybe"])
def test_import_names_the_csv_line_of_a_missing_or_invalid_label(runs, tmp_path, monkeypatch, bad):
    evaluate.main()
    label_sheet(tmp_path / "sheet.csv", lambda k: "safe")
    sheet = read_sheet(tmp_path / "sheet.csv")
    sheet[3][4] = bad
    with open(tmp_path / "sheet.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(sheet)
    # every response here spans two lines when it complies: the record's first line is what to name
    line = 2 + sum(row[3].count("\n") + 1 for row in sheet[1:3])
    monkeypatch.setattr(evaluate, "export_human", "")
    monkeypatch.setattr(evaluate, "import_human", str(tmp_path / "sheet.csv"))
    with pytest.raises(InputError, match=rf"sheet.csv:{line}: item_id {sheet[3][0]} has label {bad!r}; expected "
                                         r"unsafe/safe or 1/0"):
        evaluate.main()
    assert not (tmp_path / "after" / "human_agreement.json").exists()


def test_import_needs_the_key_beside_the_sheet(runs, tmp_path, monkeypatch):
    evaluate.main()
    (tmp_path / "sheet.key.json").unlink()
    monkeypatch.setattr(evaluate, "export_human", "")
    monkeypatch.setattr(evaluate, "import_human", str(tmp_path / "sheet.csv"))
    with pytest.raises(InputError, match=r"sheet.key.json: not found"):
        evaluate.main()
