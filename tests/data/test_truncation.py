"""fit_prompt: the least cut that fits, context before instruction (words as tokens)."""

from __future__ import annotations

from flora.data.truncation import fit_prompt


def words(text: str) -> list[str]:
    return text.split()


def fit(instruction: str, context: str, budget: int):  # type: ignore[no-untyped-def]
    return fit_prompt(
        instruction,
        context,
        prompt_length=lambda i, c: 3 + len(words(i)) + len(words(c)),  # 3: the template
        head=lambda text, n: " ".join(words(text)[:n]),
        size=lambda text: len(words(text)),
        budget=budget,
    )


def test_a_prompt_that_fits_is_left_alone():
    assert fit("a b", "c d e", 8) == ("a b", "c d e", "")


def test_the_context_is_cut_to_its_longest_start_that_fits():
    assert fit("a b", "c d e f g", 8) == ("a b", "c d e", "context")


def test_the_instruction_is_cut_only_when_no_context_is_left():
    assert fit("a b c d e", "f g", 6) == ("a b c", "", "instruction")
    assert fit("a b c d e", "", 4) == ("a", "", "instruction")


def test_nothing_fits_when_the_template_alone_is_too_long():
    assert fit("a", "b", 2) is None


def test_every_budget_gives_the_longest_fit():
    instruction, context = "i1 i2 i3 i4", "c1 c2 c3 c4 c5 c6"
    for budget in range(3, 14):
        fitted = fit(instruction, context, budget)
        assert fitted is not None
        used = 3 + len(words(fitted.instruction)) + len(words(fitted.context))
        assert used == min(budget, 13)
