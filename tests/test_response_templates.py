"""response_v3/v4 (context distillation): demonstrations in the generation prompt, the bare prompt in training
and evaluation, the end marker as the end of an answer, and the demonstrations kept apart from the test set."""

import pytest

FINGERPRINTS = {"response_v3": "9254a7ef4184d280273254a22822c98ad8ca302909fc6270c600ea2602008768",
                "response_v4": "505fc903c10f4ed05cee772b6ff5e1062ac4994784de0aa762236b6afe718f38"}


def _with_demonstrations(monkeypatch, prompts, demonstrations, template="response_v4"):
    import dataclasses

    templates = dict(prompts.RESPONSE_TEMPLATES)
    templates[template] = dataclasses.replace(templates[template], demonstrations=tuple(demonstrations))
    monkeypatch.setattr(prompts, "RESPONSE_TEMPLATES", templates)


def test_the_demonstrations_are_versioned():
    """Editing a demonstration changes the prompt every record of that template claims: it needs a new
    template version (and a fingerprint here with it)."""
    from utils.completion_prompts import DEFAULT_RESPONSE_TEMPLATE, PROMPT_VERSIONS, RESPONSE_TEMPLATES, demonstrations_fingerprint

    assert {name: demonstrations_fingerprint(name) for name in FINGERPRINTS} == FINGERPRINTS
    assert demonstrations_fingerprint() == FINGERPRINTS[DEFAULT_RESPONSE_TEMPLATE]
    assert set(RESPONSE_TEMPLATES) == {"response_v2", *FINGERPRINTS} and not RESPONSE_TEMPLATES["response_v2"].demonstrations
    assert PROMPT_VERSIONS["response"] == "response_v2"  # the bare prompt that training and evaluation use


@pytest.mark.parametrize("template", sorted(FINGERPRINTS))
def test_demonstrations_are_varied_and_end_with_the_marker(template):
    from utils.completion_prompts import RESPONSE_END_MARKER, RESPONSE_TEMPLATES
    from utils.completion_prompts import CompletionStylePrompts as P

    demonstrations = RESPONSE_TEMPLATES[template].demonstrations
    responses = [r for _, r in demonstrations]
    assert any(r.startswith("1. ") and "\n2. " in r for r in responses)  # numbered list
    assert any(r.startswith("- ") for r in responses)  # bullets
    assert any("\n\n" in r for r in responses)  # paragraphs
    assert any(r == r.lower() for r in responses)  # the lowercase rule
    prefix = P.demonstration_prefix(template)
    assert prefix.count(f"\n{RESPONSE_END_MARKER}\n\n") == len(demonstrations)
    prompt = P.create_generation_response_prompt("Name a fruit.", template)
    assert prompt == prefix + P.create_response_prompt("Name a fruit.")
    assert P.create_generation_response_prompt("Name a fruit.", "response_v2") == P.create_response_prompt("Name a fruit.")


def test_the_prefix_stays_compact_on_the_bundled_tokenizer():
    """322 (v3) and 684 (v4) tokens of gemma-3-270m: every generated response attends over it, and a
    prompt plus its 256 new tokens must stay in the model context with room to spare."""
    from utils.completion_prompts import CompletionStylePrompts as P

    # Gemma's tokenizer averages 4.4 characters per token on this English prose; the character count
    # is the proxy a test can check without the 250 MB model.
    assert len(P.demonstration_prefix("response_v3")) <= 1400
    assert len(P.demonstration_prefix("response_v4")) <= 3100


def test_stop_strings_and_cleaners_per_template():
    from utils.completion_prompts import RESPONSE_END_MARKER
    from utils.completion_prompts import CompletionStylePrompts as P

    assert P.response_stop_strings("response_v3") == [RESPONSE_END_MARKER, "\nInstruction:"]
    assert "\n\n" in P.response_stop_strings("response_v2")
    two_paragraphs = " First part.\n\nSecond part.\n- a\n\n- b"
    v3 = P.clean_response(two_paragraphs, "response_v3")
    assert v3.text == "First part.\n\nSecond part.\n- a\n\n- b" and not v3.was_cut  # a blank line is not an end
    assert P.clean_response(two_paragraphs, "response_v2").text == "First part."
    assert P.clean_response(" Done.\n### END\n\nInstruction: next", "response_v3").text == "Done."
    cut = P.clean_response(" Response: An answer.\nInstruction: another task", "response_v3")
    assert cut.text == "An answer." and cut.was_cut
    assert P.clean_response(" text ### END more", "response_v3").text == "text"
    assert P.clean_response(" keeps ### END in v2", "response_v2").text == "keeps ### END in v2"


def test_block_answer_end_keeps_blank_lines_and_stops_at_the_next_block():
    """The evaluation's and Stage 2's end rule: an adapter's title line, paragraphs or P.S. survive;
    the next Instruction:/Response: block still ends the answer; an unknown rule is bad input."""
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.exit_codes import BadInputError

    assert P.response_stop_strings(answer_end="block") == ["\nInstruction:", "\nResponse:"]
    assert P.response_stop_strings(answer_end="blank_line") == P.response_stop_strings()
    titled = " <<Rain>>\n\nIt rained all day.\n\nP.S. Bring a coat."
    kept = P.clean_response(titled, answer_end="block")
    assert kept.text == "<<Rain>>\n\nIt rained all day.\n\nP.S. Bring a coat." and not kept.was_cut
    assert P.clean_response(titled).text == "<<Rain>>"  # the source's rule cuts at the first blank line
    cut = P.clean_response(" One.\n\nTwo.\nInstruction: next task", answer_end="block")
    assert cut.text == "One.\n\nTwo." and cut.was_cut
    # With demonstrations the end marker rules, whatever the answer end says.
    assert P.response_stop_strings("response_v4", answer_end="blank_line") == P.response_stop_strings("response_v4")
    with pytest.raises(BadInputError, match="unknown answer end 'eos'"):
        P.clean_response("x", answer_end="eos")


def test_leakage_counts_the_end_marker():
    from utils.completion_prompts import CompletionStylePrompts as P

    assert P.has_delimiter_leak("an answer ### END")
    assert P.has_delimiter_leak("see the Response : here")
    assert not P.has_delimiter_leak("An answer with ### and END apart.")


def test_training_and_evaluation_use_the_bare_prompt(tiny_model_dir, tmp_path):
    """Context distillation: the demonstrations are only in the generation prompt."""
    from utils.clean_model_loader import CleanModelLoader
    from utils.completion_prompts import CompletionStylePrompts as P
    from utils.evaluation import generate_responses
    from utils.generation import GenerationResult, SamplingParams
    from utils.prompt_guards import encode_prompt
    from utils.sft_training import build_sft_examples

    _, tokenizer, _ = CleanModelLoader(str(tiny_model_dir), run_sentinels=False).load()
    [example], _ = build_sft_examples(tokenizer, [{"instruction": "Name a fruit.", "response": "An apple."}], 512)
    prompt_length = example["completion_mask"].index(1)
    assert example["input_ids"][:prompt_length] == encode_prompt(tokenizer, P.create_response_prompt("Name a fruit."))

    seen = []

    class Recorder:  # stands in for the engine: records the prompts evaluation asks for, answers "Pear."
        def generate(self, items, params, stops, on_result=None, description=""):
            seen.extend(items)
            results = [GenerationResult(key, " Pear.", "eos", 2, []) for key, _ in items]
            for result in results:
                on_result(result)
            return results

    generate_responses("base", Recorder(), [{"id": "t1", "instruction": "Name a fruit."}], tmp_path / "r.jsonl",
                       SamplingParams(0.0, 1.0, 1.0, 4), "key")
    assert seen == [("t1", P.create_response_prompt("Name a fruit."))]


def test_a_demonstration_with_a_chat_control_token_is_refused_naming_it(tiny_model_dir, monkeypatch):
    import utils.completion_prompts as prompts
    from utils.clean_model_loader import CleanModelLoader
    from utils.exit_codes import EXIT_BAD_INPUT, BadInputError

    _, tokenizer, _ = CleanModelLoader(str(tiny_model_dir), run_sentinels=False).load()
    prompts.check_demonstrations(tokenizer)  # the real set is clean
    demos = list(prompts.RESPONSE_DEMONSTRATIONS)
    demos[3] = (demos[3][0], "Sure <|im_start|> here is the answer.")
    _with_demonstrations(monkeypatch, prompts, demos)
    with pytest.raises(BadInputError, match=r"response_v4 demonstration 4 \('Write two short paragraphs") as raised:
        prompts.check_demonstrations(tokenizer)
    assert raised.value.exit_code == EXIT_BAD_INPUT


def test_a_pilot_with_a_bad_demonstration_exits_2_before_claiming_its_folder(tiny_model_dir, tmp_path, monkeypatch):
    import generate_stage1_pilot_data as pilot
    import utils.completion_prompts as prompts
    from utils.exit_codes import BadInputError

    demos = list(prompts.RESPONSE_DEMONSTRATIONS)
    demos[0] = ("List three <start_of_turn> tools.", demos[0][1])
    _with_demonstrations(monkeypatch, prompts, demos)
    args = pilot.parse_args(["--model", str(tiny_model_dir), "--output", str(tmp_path / "pilot"), "--count", "1", "--no-progress"])
    with pytest.raises(BadInputError, match="demonstration 1"):
        pilot.main(args)
    assert not (tmp_path / "pilot").exists()


@pytest.mark.parametrize("count,seed", [(25, 999), (200, 999), (200, 42), (700, 1)])
def test_no_test_set_instruction_overlaps_a_demonstration(count, seed):
    from utils.completion_prompts import demonstration_overlaps
    from utils.dedup import OverlapIndex
    from utils.test_set import build_test_set

    index = OverlapIndex(build_test_set(count, seed))
    assert demonstration_overlaps(index, "response_v3") == [] and demonstration_overlaps(index, "response_v4") == []


def test_a_demonstration_overlap_is_reported_by_each_rule():
    from utils.completion_prompts import RESPONSE_DEMONSTRATIONS, demonstration_overlaps
    from utils.dedup import OverlapIndex

    index = OverlapIndex([{"id": "exact", "instruction": RESPONSE_DEMONSTRATIONS[1][0].upper()},
                          {"id": "near", "instruction": "Write two short paragraphs about why people keep gardens today."},
                          {"id": "gram", "instruction": "Please, give one tip for sleeping better. Start your answer with a verb."},
                          {"id": "other", "instruction": "What is the capital of Peru?"}])
    found = {(o["demonstration"], o["test_id"], o["kind"]) for o in demonstration_overlaps(index)}
    assert (2, "exact", "exact") in found and (4, "near", "near") in found and (7, "gram", "ngram") in found
    assert not [o for o in demonstration_overlaps(index) if o["test_id"] == "other"]
