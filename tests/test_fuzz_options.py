"""Property tests of the command-line parsers: any text given to an option is parsed or refused with one
SwtoolError line, never another exception (a ValueError from int() or float(), a re.error, a KeyError).

Half the texts are the option's own forms with their numbers drawn from NUMBERS (so they reach the
parsers' number checks), the other half its vocabulary in any order, or arbitrary Unicode."""


import pytest
from hypothesis import given, strategies as st

from fixtures.fuzzing import fuzz_settings
from swtool.errors import SwtoolError

# numbers as options spell them, and digits int() and float() refuse: '²' is str.isdigit(), 'Ⅷ' str.isnumeric();
# the Arabic-Indic '٣' is a decimal digit that both read
NUMBERS = ["0", "1", "2", "7", "32", "256", "\u00b2", "\u0663", "\u2167", "1e400", "nan", "-1", "0.5", "5%", "1\n", ""]
PIECES = NUMBERS + ["-", ".", "%", ":", ",", "+", "=", " ", "\n", "importance", "random", "self", "scan", "text", "keep",
                    "control", "isolate", "none", "q4_0", "q8_0", "f16", "q4_k_m", "tensor", "zscore", "percentile",
                    "(", "[", "*"]
FORMS = {"--zero": ["{}:{}:{}"], "--drop-expert": ["{}:{}"], "--importance": ["random:{}", "self:{}", "text:{}"],
         "--tolerance": ["{}", "{}%"], "eval --sweep": ["{},{}", "{}"], "--type": ["{}", "q{}_k"],
         "--tensor-type": ["blk\\.{}={}", "{}=q8_0"], "--block-sizes": ["{},{},tensor", "{}"],
         "--clip": ["zscore:{}", "percentile:{}"], "--handlings": ["importance:random:{}", "keep:{}+importance:self:{}"],
         "--types": ["q4_0,{}", "{}"]}


def parsers():
    from swtool.audit import parse_tolerance
    from swtool.coordinate import Coordinate
    from swtool.experiments import parse_scales
    from swtool.experts import parse_expert
    from swtool.export_importance import parse_importance
    from swtool.quant.policy import parse_target, parse_tensor_types
    from swtool.quantsim import parse_block_sizes, parse_clip
    from swtool.sweep import parse_handlings, parse_types

    return {"--zero": Coordinate.parse, "--drop-expert": parse_expert, "--importance": parse_importance,
            "--tolerance": parse_tolerance, "eval --sweep": parse_scales, "--type": parse_target,
            "--tensor-type": lambda text: parse_tensor_types([text]), "--block-sizes": parse_block_sizes,
            "--clip": parse_clip, "--handlings": parse_handlings, "--types": parse_types}


def texts(option):
    forms = st.sampled_from(FORMS[option]).flatmap(
        lambda form: st.lists(st.sampled_from(NUMBERS), min_size=form.count("{}"), max_size=form.count("{}"))
        .map(lambda numbers: form.format(*numbers)))
    return forms | st.lists(st.sampled_from(PIECES), max_size=8).map("".join) | st.text(max_size=12)


@pytest.mark.parametrize("option", sorted(FORMS))
def test_an_option_is_parsed_or_refused_in_one_line(option):
    parse = parsers()[option]
    outcomes = {"parsed": 0, "refused": 0}

    @fuzz_settings(300)
    @given(text=texts(option))
    def run(text):
        try:
            parse(text)
            outcomes["parsed"] += 1
        except SwtoolError as e:
            assert str(e) and "\n" not in str(e), repr(e)
            outcomes["refused"] += 1

    run()
    assert outcomes["refused"] > 0 and outcomes["parsed"] > 0, outcomes  # both ways taken: the parser was reached
