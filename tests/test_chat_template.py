"""Chat templates render as HF transformers' apply_chat_template renders them, text and token ids."""

import json

import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.chat_template import ChatTemplate, ChatTemplateError, check_messages, load_chat_template
from model.tokenizer import HFTokenizer, load_tokenizer

CORPUS = ["In the beginning God created the heaven and the earth.",
          "A hacker is a person who enjoys exploring the details of programmable systems.",
          "You are a helpful assistant. What is a kludge? <b>bold</b> & \"quotes\""] * 30
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CHATML = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-2 style: whitespace control, raise_exception on a bad role order, a system prompt folded in
LLAMA2 = """{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}
    {% set system_message = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}
{% else %}
    {% set loop_messages = messages %}
    {% set system_message = '' %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.index0 == 0 %}
        {% set content = system_message + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ ' ' + content | trim + ' ' + eos_token }}
    {% endif %}
{% endfor %}
"""
# tojson (no HTML escaping), namespace, loop controls, a {% generation %} block, tools=None
FANCY = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
{%- if m.role == 'system' %}{% continue %}{% endif -%}
{%- set ns.n = ns.n + 1 -%}
<|im_start|>{{ m.role }} {{ ns.n }} {{ m | tojson }}
{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% endif %}<|im_end|>
{% endfor -%}
{%- if tools is not none %}TOOLS{% endif -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is a kludge?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "  In the beginning  "},
     {"role": "assistant", "content": "God created the heaven."},
     {"role": "user", "content": "<b>bold</b> & \"quotes\" — ünïcödé"}],
]


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok.to_str()


def hf_tokenizer(tokenizer_json: str, template: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer_json), bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", chat_template=template)


@pytest.mark.parametrize("template", [CHATML, LLAMA2, FANCY], ids=["chatml", "llama2", "fancy"])
def test_render_and_ids_equal_hf_apply_chat_template(tmp_path, tokenizer_json, template):
    hf = hf_tokenizer(tokenizer_json, template)
    hf.save_pretrained(tmp_path)  # as HF lays a checkpoint out: tokenizer_config.json + chat_template.jinja
    ours = load_chat_template(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = ours.render(check_messages(messages))
        assert text == expected
        expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert tok.encode_batch([text], add_bos=False, parse_special=True)[0] == expected_ids


def test_template_errors_are_the_templates_own_message(tokenizer_json):
    hf = hf_tokenizer(tokenizer_json, LLAMA2)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="roles must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match="roles must alternate") as e:
        ChatTemplate(LLAMA2, {"bos_token": "<s>", "eos_token": "</s>"}).render(bad)
    assert e.value.kind == "chat_template_error"


def test_template_comes_from_tokenizer_config_string_or_named_list(tmp_path):
    assert load_chat_template(str(tmp_path)) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "special": True},
         "chat_template": "{{ bos_token }}{{ messages[0].content }}"}))
    assert load_chat_template(str(tmp_path)).render([{"role": "user", "content": "x"}]) == "<s>x"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]}))
    user_x = [{"role": "user", "content": "x"}]
    assert load_chat_template(str(tmp_path), {"eos_token": "</s>"}).render(user_x) == "D</s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "rag", "template": "R"}]}))
    with pytest.raises(ValueError, match="none named 'default'"):
        load_chat_template(str(tmp_path))
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")  # HF's file wins over the config
    assert load_chat_template(str(tmp_path)).render([{"role": "user", "content": "x"}]) == "J1"


def test_sandbox_blocks_python_internals():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages, words", [
    ([], "non-empty list"), ("hi", "non-empty list"), ([{"content": "x"}], "role"),
    ([{"role": "user", "content": 5}], "content must be"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text part"),
])
def test_bad_messages_name_the_bad_value(messages, words):
    with pytest.raises(ChatTemplateError, match=words) as e:
        check_messages(messages)
    assert e.value.kind == "invalid_messages"


def test_text_parts_are_joined():
    got = check_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert got == [{"role": "user", "content": "a\nb"}]


def test_sentencepiece_reads_control_piece_text_as_the_token():
    tok = load_tokenizer("model/assets/demo")
    ref = sentencepiece.SentencePieceProcessor(model_file="model/assets/demo/tokenizer.model")
    text = "<s>[INST] The hacker [/INST] A kludge</s>"
    ids = tok.encode_batch([text], add_bos=False, parse_special=True)[0]
    assert ids == [ref.bos_id()] + ref.encode("[INST] The hacker [/INST] A kludge") + [ref.eos_id()]
    assert tok.encode_batch([text], add_bos=False)[0] == ref.encode(text)  # by default, text is text
    assert tok.special_tokens()["<s>"] == ref.bos_id()


def test_hf_special_tokens(tokenizer_json):
    tok = HFTokenizer(tokenizer_json, {"bos": 1, "eos": 2, "pad": 0})
    assert tok.special_tokens() == {s: i for i, s in enumerate(SPECIAL)}
