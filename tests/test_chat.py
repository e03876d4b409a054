"""minqlora/chat.py and `--prompt_template chat`: the folder's chat template rendered as transformers'
apply_chat_template renders it (less the leading BOS string, which the data code adds as an id), the
instruction as the user turn, few-shot examples as earlier turns; ppl.py, predict.py and training take it;
a folder without a template is refused naming it, exit 2."""
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from minqlora.chat import ChatPrompt, ChatTemplateError, prompt_for
from minqlora.course import FewShotPrompt
from minqlora.data import Prompt
from minqlora.errors import BadInput
from minqlora.tokenizer import Tokenizer
from minqlora.train_args import parse_args, training_data

REPO = Path(__file__).resolve().parents[1]
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system here') }}{% endif %}"
          "{% for message in messages %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
          "{% endif %}{% endfor %}")
# transformers' Jinja additions: strftime_now (Llama 3.2's system turn) and a tojson without HTML escapes
DATED = ("{{ 'Today Date: ' + strftime_now('%d %b %Y') + '\n' }}{% for message in messages %}"
         "{{ message['role'] + ': ' + (message['content'] | tojson) + '\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ 'assistant: <&>' }}{% endif %}")
RECORD = {"id": "r", "instruction": "翻譯成文言文：\n我今天要去京城。", "output": "吾今日將往京師。"}
SHOTS = [{"instruction": "將軍聞之，大怒。翻譯成現代文", "output": "將軍聽了很生氣。"},
         {"instruction": "若汝不往", "output": "如果你不去"}]


def tiny_with_template(tmp_path, template, specials_in_map_only=False):
    folder = tmp_path / "tiny"
    shutil.copytree(REPO / "weights" / "tiny", folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    if specials_in_map_only:  # bos_token and eos_token in special_tokens_map.json alone, as older folders have
        del cfg["bos_token"], cfg["eos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    return folder


@pytest.mark.parametrize("template, map_only", [(LLAMA2, False), (CHATML, False), (DATED, False), (LLAMA2, True)])
def test_render_equals_transformers(tmp_path, template, map_only):
    transformers = pytest.importorskip("transformers")
    folder = tiny_with_template(tmp_path, template, specials_in_map_only=map_only)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    chat = ChatPrompt(folder)
    turns = [{"role": "user", "content": SHOTS[0]["instruction"]}, {"role": "assistant", "content": SHOTS[0]["output"]},
             {"role": "user", "content": SHOTS[1]["instruction"]}, {"role": "assistant", "content": SHOTS[1]["output"]},
             {"role": "user", "content": RECORD["instruction"]}]
    for messages, ours in ((turns[-1:], chat(RECORD)), (turns, FewShotPrompt(chat, SHOTS)(RECORD))):
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if want.startswith(hf.bos_token):
            want = want[len(hf.bos_token):]  # the data code puts the BOS id in front itself
        assert ours == want


def test_course_prompt_stays_the_default_and_other_names_pass_through(tmp_path):
    assert isinstance(prompt_for("course"), Prompt) and prompt_for("alpaca").name == "alpaca"
    with pytest.raises(ChatTemplateError, match="needs a model folder"):
        prompt_for("chat")
    with pytest.raises(ChatTemplateError, match=re.escape(str(REPO / "weights" / "tiny"))):
        prompt_for("chat", REPO / "weights" / "tiny")  # tiny has no template
    with pytest.raises(ChatTemplateError, match="refused: no system here"):
        ChatPrompt(tiny_with_template(tmp_path, LLAMA2)).render([{"role": "system", "content": "x"}])


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_ppl_and_predict_take_chat(tmp_path, capsys):
    folder = tiny_with_template(tmp_path, CHATML)
    data = tmp_path / "test.json"
    data.write_text(json.dumps([RECORD, {**RECORD, "id": "s", "instruction": "若汝不往"}, *[
        {**s, "id": f"p{i}"} for i, s in enumerate(SHOTS)]], ensure_ascii=False))
    flags = ["--base_model_path", str(folder), "--bits", "16", "--device", "cpu", "--progress", "False",
             "--test_data_path", str(data), "--prompt_template", "chat"]
    assert load_script("ppl")(flags + ["--few_shot", "1", "--repeats", "2"]) == 0
    assert "Mean perplexity:" in capsys.readouterr().out
    out = tmp_path / "pred.json"
    assert load_script("predict")(flags + ["--output_path", str(out), "--max_new_tokens", "4"]) == 0
    assert [p["id"] for p in json.loads(out.read_text())] == ["r", "s", "p0", "p1"]
    bare = ["--base_model_path", str(REPO / "weights" / "tiny")] + flags[2:]
    assert load_script("ppl")(bare) == 2
    assert "no chat template" in capsys.readouterr().err


def test_training_data_uses_the_chat_prompt(tmp_path):
    folder = tiny_with_template(tmp_path, CHATML)
    data = tmp_path / "train.json"
    data.write_text(json.dumps([RECORD] * 3, ensure_ascii=False))
    _, a = parse_args(["--model_name_or_path", str(folder), "--dataset", str(data), "--dataset_format", "course",
                       "--prompt_template", "chat", "--source_max_len", "512"])
    train_ex, _, _, _ = training_data(a, Tokenizer.from_dir(folder), progress=False)
    tok = Tokenizer.from_dir(folder)
    source = [tok.bos_id] + tok.encode(ChatPrompt(folder)(RECORD))
    assert train_ex[0].input_ids[:len(source)] == source
    with pytest.raises(BadInput, match="--dataset_format course or alpaca"):
        parse_args(["--prompt_template", "chat", "--dataset_format", "input-output"])
