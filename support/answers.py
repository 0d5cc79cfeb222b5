"""How a prediction is judged right by rules: the answer matching behind `rewards.outcome_reward`'s
accuracy term, the rule judge (support/judge.py) and majority votes. Stdlib only.

Answer judging (accuracy; pure rules, support/judge.py adds an optional model judge beside them)
    Tokens are those of normalize_answer(text): numbers, words, and the marks . , ; : ! ? / &. A
    prediction is ONE SENTENCE when it has no line break and no '.', '!', '?' or ';' between words, and
    SHORT at 1..15 words; a reference is SHORT at 1..4 words. NEGATION words: not, no, never, none,
    nothing, nobody, nowhere, neither, nor, cannot, without, any "...n't". LISTING words: or, and, nor,
    either, neither, both, versus, vs, '/', '&'.
    Before every rule the prediction is read for its claim (`claim`): full-width forms made ASCII; one
    \\boxed{x} or **x** that holds the answer unwrapped; hedges ("appears to be", "seems to be", "looks
    (like)", "probably", "likely") read as "is", " in color" dropped; a corrected negation ("It is not
    red; it is yellow.", "Not A, but B") read as its last clause, only when every earlier clause negates
    and the last does not.
    Free form (no choices): pred is right if, in order,
      1. normalize_answer(pred) == normalize_answer(answer);
      2. answer is one number (digits, "1,000", "3.50"; a '%' sign is dropped, so "50%" = 50 but 0.5 !=
         50%; number words zero..twenty, "one" only alone): pred is one short sentence whose ANSWER
         PHRASE (the words after its last is/are/was/were, else all of it) holds exactly one number,
         equal by value, and no negation, listing or hedge word (than, least, most): "There are 3
         dogs." = "3"; "3 or 4", "not 3", "more than 3", "The two dogs are brown" (phrase "brown"):
         not 3 / 2. Rule 2 alone judges a number answer;
      3. answer is "yes" / "no": pred (<= 15 words) opens with that word followed by ',', '.', '!' or
         its end, and never says the other one ("Yes, the umbrella is yellow."); an answer that opens
         with "Yes," / "No." etc. is also stated by a pred stating that word ("no" = "No, the spots are
         on a banana.");
      4. a short answer ENDS a short one-sentence pred longer than it, not right after a comma, with no
         negation or listing word before it and no number before it in pred's answer phrase: "The
         umbrella is yellow.", "It's yellow" = "yellow"; "not yellow", "isn't yellow", "blue or
         yellow", "red, yellow", "the yellow one", "it 3 yellow": wrong. The end anchor is the
         anti-hacking rule: a sentence ends with at most one of several one-word answers;
      5. answer is a one-sentence "... is/are/was/were P" and pred states P by 1-4 ("tan" = "The
         countertop is tan.");
      6. answer is one position word (left, right, top, bottom, above, below, front, behind, inside,
         outside ...; "on the left", "left side"): pred is one sentence with no negation, listing word or
         number, names that word once and no other of its group (left/right, above/below ...), and after
         it only fillers and words of the question ("The cup is to the left of the laptop." = "left";
         "..., which is on the right", "not on the left": wrong);
      7. answer is a number with an optional unit ("2.5 m", "2.5", "50%"): pred is one sentence whose
         answer phrase states one number, equal by value, its unit the same (m = meter = meters, km =
         kilometers, % = percent ...) or given on one side only ("2.5" = "2.5 m" = "The door is 2.5
         meters tall."; "2.5 km", "12.5 m": wrong);
      8. answer is "no": pred is one sentence that negates and says no "yes" and lists nothing ("There is
         no dog in the picture."), unless the question itself negates ("Is the sign not red?");
      9. answer is a list of 2+ items joined by "and", "," or "&": pred's answer phrase is such a list of
         the same items in any order ("red and white" = "The flag is white and red."; "or", a negation or
         a missing item: wrong);
     10. answer holds Chinese: pred's claim after its last 是/为 (a final 的 dropped), or all of it, equals
         the answer, and pred holds no 不, 没 or 非 ("伞是黄色的" = "黄色"; "伞不是黄色的": wrong).
    Multiple choice: right if choice_index(pred) is the correct option (answer_index: the answer is a
    letter or an option's text). Letters count wherever they are explicit: "B", "B.", "(B) blue",
    "Answer: (B)", "The answer is B", "I choose B". Two different letters, a letter out of range, or a
    letter followed by text that names another option or none ("(B) red", "B. purple") -> wrong. Chinese
    keywords name letters too ("答案是B", "答案：(B)", "选B"). With no
    letter, the text names the option it equals; else the options it states by 2-5 (the longest if
    several); else the option that alone contains its short answer phrase ('yellow' -> "The color of the
    umbrella is yellow.").
    Votes: vote_key(pred, choices) -> "option:B" | "number:3" | "text:yes" | "list:<sorted items>" |
    "text:<answer phrase>", of the prediction's claim, and same_answer(a, b) = equal keys (see vote_key):
    one answer phrased several ways ("yellow", "It appears to be yellow in color.", "\\boxed{yellow}") is
    one vote.
"""
import re
import unicodedata
from decimal import Decimal

# ----------------------------------------------------------------------------- answers

_PAIRS = {"(": ")", "[": "]", "{": "}", '"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019"}
_ARTICLES = ("the ", "a ", "an ")


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer, for exact-match judging. In order:
    1. lowercase; collapse every whitespace run to one space; strip both ends;
    2. repeat until nothing changes: drop trailing '.', ',', '!', '?' (and the spaces before them);
       drop one surrounding pair of quotes ("", '', ``, curly) or brackets ((), [], {}), a bracket
       pair only when the inside holds no other bracket of that kind ("(a) and (b)" is kept);
    3. drop ONE leading "the ", "a " or "an " (a lone "a" stays: it may be a letter).
    Example: '  "The Red  Car." ' -> 'red car'."""
    s = " ".join(text.lower().split())
    while True:
        before = s
        s = s.rstrip(".,!? ")
        if len(s) >= 2 and _PAIRS.get(s[0]) == s[-1]:
            inner = s[1:-1]
            if s[0] in "\"'`\u201c\u2018" or not (s[0] in inner or s[-1] in inner):
                s = inner.strip()
        if s == before:
            break
    for article in _ARTICLES:
        if s.startswith(article):
            return s[len(article):].strip()
    return s


SHORT_WORDS = 4       # a "short" answer: 1..4 words
SENTENCE_WORDS = 15   # a "short" prediction: at most 15 words

# Tokens of a normalised answer: numbers ("3", "-2", "3.5", "1,000", "50%"; not "3rd"), words (letters and
# digits, inner ' or - allowed: "isn't", "light-blue"), and the marks . , ; : ! ? / & (one token each).
_TOKEN = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?(?![^\W_])"
                    r"|[^\W_]+(?:['-][^\W_]+)*|[.,;:!?/&]")
_MARKS = frozenset(".,;:!?/&")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?")
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_CONTRACTIONS = {"it's": ("it", "is"), "that's": ("that", "is"), "there's": ("there", "is"),
                 "here's": ("here", "is"), "what's": ("what", "is"), "they're": ("they", "are")}
_NEGATIONS = frozenset("not no never none nothing nobody nowhere neither nor cannot without".split())
_LISTING = frozenset("or and nor either neither both versus vs / &".split())
_HEDGES = frozenset("than least most".split())      # "more than 3", "at least 3", "at most 3"
_COPULAS = frozenset("is are was were".split())
_YES_NO = ("yes", "no")
_OPENER_MARKS = frozenset(",.!")    # "Yes, ...", "No. ...", "Yes!"
_SENTENCE_ENDS = frozenset(".!?;")


def _tokens(text: str) -> list[str]:
    """normalize_answer(text) (curly apostrophes straightened) cut into _TOKEN tokens, with the pronoun
    contractions of _CONTRACTIONS expanded ("it's" -> "it", "is")."""
    out = []
    for t in _TOKEN.findall(normalize_answer(text.replace("\u2019", "'"))):
        out.extend(_CONTRACTIONS.get(t, (t,)))
    return out


def _words(tokens: list[str]) -> list[str]:
    return [t for t in tokens if t not in _MARKS]


def _blocked(tokens: list[str]) -> bool:
    """True if any token negates ("not", "no", "isn't", ...) or lists ("or", "and", "/", ...)."""
    return any(t in _NEGATIONS or t in _LISTING or t.endswith("n't") for t in tokens)


def _one_sentence(text: str, tokens: list[str]) -> bool:
    """One sentence: no line break inside, no '.', '!', '?' or ';' between words (a final one is dropped by
    normalize_answer; a decimal point belongs to its number), and 1..SENTENCE_WORDS words."""
    return ("\n" not in text.strip() and not any(t in _SENTENCE_ENDS for t in tokens)
            and 1 <= len(_words(tokens)) <= SENTENCE_WORDS)


def _number(token: str, alone: bool = False) -> Decimal | None:
    """The value of a number token: digits (',' thousands separators and a '%' sign dropped: "50%" -> 50)
    or a number word zero..twenty; "one" only when it is the whole answer (`alone`): "the red one"."""
    if _NUMBER.fullmatch(token):
        return Decimal(token.replace(",", "").rstrip("%"))
    if token in _NUMBER_WORDS and (token != "one" or alone):
        return Decimal(_NUMBER_WORDS[token])
    return None


def _sole_number(tokens: list[str]) -> Decimal | None:
    """The number that `tokens` state: exactly one number token, and no negation, listing or hedge word
    ("3 or 4", "not 3", "more than 3" state none)."""
    nums = [v for v in (_number(t, alone=len(tokens) == 1) for t in tokens) if v is not None]
    if len(nums) != 1 or _blocked(tokens) or any(t in _HEDGES for t in tokens):
        return None
    return nums[0]


def _answer_phrase(text: str) -> list[str]:
    """The tokens of the answer a prediction gives: in a one-sentence prediction with a copula (is, are,
    was, were), the tokens after the LAST copula, one leading article dropped ("The umbrella is yellow."
    -> ["yellow"]); otherwise all its tokens."""
    toks = _tokens(text)
    cops = [i for i, t in enumerate(toks) if t in _COPULAS]
    if _one_sentence(text, toks) and cops and cops[-1] < len(toks) - 1:
        phrase = toks[cops[-1] + 1:]
        return phrase[1:] if phrase[0] in ("the", "a", "an") and len(phrase) > 1 else phrase
    return toks


def _ends_with(pred: str, ptoks: list[str], rtoks: list[str]) -> bool:
    """The containment rule: a short reference (1..SHORT_WORDS words) ends a short one-sentence prediction
    that is longer than it, is not preceded by a comma ("red, yellow"), no token before it negates or
    lists, and no number precedes it in the prediction's answer phrase ("it 3 green" states 3, not green).
    Anchoring at the end means a prediction states at most one of several one-word answers, so packing
    candidates into a sentence earns nothing."""
    n = len(rtoks)
    if not (1 <= len(_words(rtoks)) <= SHORT_WORDS) or len(ptoks) <= n or ptoks[-n:] != rtoks:
        return False
    rest, phrase = ptoks[:-n], _answer_phrase(pred)
    numbers = any(_number(t) is not None for t in phrase[:-n])
    return _one_sentence(pred, ptoks) and rest[-1] != "," and not _blocked(rest) and not numbers


def _states(pred: str, ref: str) -> bool:
    """Does the prediction state the reference answer? The free-form rules of `accuracy`, in order."""
    p, r = normalize_answer(pred), normalize_answer(ref)
    if not p or not r:
        return False
    if p == r:
        return True
    ptoks, rtoks = _tokens(pred), _tokens(ref)
    if not ptoks or not rtoks:                        # only symbols outside _TOKEN ("—", "%")
        return False
    value = _number(rtoks[0], alone=True) if len(rtoks) == 1 else None
    if value is not None:
        return _one_sentence(pred, ptoks) and _sole_number(_answer_phrase(pred)) == value
    if r in _YES_NO and len(_words(ptoks)) <= SENTENCE_WORDS and ptoks[0] == r:
        opposite = _YES_NO[1 - _YES_NO.index(r)]
        if (len(ptoks) == 1 or ptoks[1] in _OPENER_MARKS) and opposite not in ptoks:
            return True
    if rtoks[0] in _YES_NO and len(rtoks) > 1 and rtoks[1] in _OPENER_MARKS and _states(pred, rtoks[0]):
        return True                                   # "No, the spots are on a banana." -> "no"
    if _ends_with(pred, ptoks, rtoks):
        return True
    phrase = _answer_phrase(ref)
    return phrase != rtoks and not _blocked(phrase) and _states(pred, " ".join(phrase))


# ----------------------------------------------------------------------------- what a prediction claims

_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")
_HEDGE = re.compile(r"\b(?:appears|appear|seems|seem)\s+to\s+be\b|\b(?:looks|look)\s+like(?:\s+it\s+is)?\b|"
                    r"\b(?:looks|appears|seems)\b", re.IGNORECASE)
_HEDGE_ADVERB = re.compile(r"\b(?:most\s+likely|probably|likely|apparently)\b,?\s*", re.IGNORECASE)
_IN_COLOUR = re.compile(r"\s+in\s+(?:colou?r|shade|hue)\b", re.IGNORECASE)
_CLAUSE = re.compile(r"\s*(?:[;,]|\.(?=\s)|\s+but\s+|\s+rather\s+|\s+-\s+|\u2014)\s*", re.IGNORECASE)
_WIDE = str.maketrans({"\u3002": ".", "\uff0c": ",", "\uff1b": ";", "\u3001": ","})


def _unwrap(text: str) -> str:
    """`text` with full-width forms made ASCII (NFKC; the ideographic full stop and comma too) and ONE
    \\boxed{x} (or **x**) that holds the whole answer unwrapped: "The answer is \\boxed{B}." -> "B"."""
    text = unicodedata.normalize("NFKC", text).translate(_WIDE)
    for rx in (_BOXED, _BOLD):
        found = rx.findall(text)
        if len(found) == 1 and found[0].strip():
            return found[0].strip()
    return text


def claim(pred: str) -> str:
    """What a prediction claims, before the rules judge it:
    1. `_unwrap`: full-width forms, one \\boxed{x} or **x**;
    2. hedges say "is": "appears to be", "seems to be", "looks like (it is)", "looks", "seems" -> "is";
       "probably", "likely", "most likely", "apparently" dropped; " in color" dropped after a word
       ("The umbrella appears to be yellow in color." -> "The umbrella is yellow.");
    3. a correction: when the prediction is several clauses (split at ; , ". " but rather - and an em
       dash), the last one holds no negation and EVERY earlier one does, the last clause alone is the
       claim ("It is not red; it is blue." -> "it is blue"; "Not A, but B" -> "B"). A negation that is
       not corrected stays, and the rules then judge it wrong ("It is not blue.")."""
    text = _unwrap(pred)
    text = _IN_COLOUR.sub("", _HEDGE_ADVERB.sub("", _HEDGE.sub("is", text)))
    text = re.sub(r"\bis\s+is\b", "is", text)
    clauses = [c for c in _CLAUSE.split(text.strip().rstrip(".!? ")) if c.strip()]
    if len(clauses) >= 2 and not _negates(clauses[-1]) and all(_negates(c) for c in clauses[:-1]):
        return clauses[-1].strip()
    return text


def _negates(text: str) -> bool:
    return any(t in _NEGATIONS or t.endswith("n't") for t in _tokens(text)) or bool(re.search("[\u4e0d\u6ca1\u975e]", text))


_POSITION_GROUPS = (frozenset("left right".split()), frozenset("top bottom above below upper lower over under beneath".split()),
                    frozenset("front behind back".split()), frozenset("inside outside".split()))
_POSITION_FILLER = frozenset("on the to in at of side hand part corner".split())
_UNITS = {**{u: "m" for u in ("m", "meter", "meters", "metre", "metres")},
          **{u: "cm" for u in ("cm", "centimeter", "centimeters", "centimetre", "centimetres")},
          **{u: "mm" for u in ("mm", "millimeter", "millimeters", "millimetre", "millimetres")},
          **{u: "km" for u in ("km", "kilometer", "kilometers", "kilometre", "kilometres")},
          **{u: "ft" for u in ("ft", "foot", "feet")}, **{u: "in" for u in ("inch", "inches")},
          **{u: "kg" for u in ("kg", "kilogram", "kilograms", "kilo", "kilos")},
          **{u: "g" for u in ("g", "gram", "grams")}, **{u: "lb" for u in ("lb", "lbs", "pound", "pounds")},
          **{u: "%" for u in ("percent", "per cent")}, **{u: "mph" for u in ("mph",)},
          **{u: "s" for u in ("s", "sec", "secs", "second", "seconds")},
          **{u: "min" for u in ("min", "mins", "minute", "minutes")}, **{u: "h" for u in ("h", "hr", "hrs", "hour", "hours")},
          **{u: "year" for u in ("year", "years", "yr", "yrs")}, **{u: "deg" for u in ("degree", "degrees", "deg")}}


def _states_more(pred: str, ref: str, question: str = "") -> bool:
    """The free-form rules 6-10 (module docstring), each as strict as rules 1-5: positions, quantities
    with units, a negative sentence for "no", unordered lists, Chinese."""
    r = normalize_answer(ref)
    ptoks, rtoks = _tokens(pred), _tokens(ref)
    if not ptoks or not rtoks:
        return _cjk_states(pred, ref)
    one = _one_sentence(pred, ptoks)
    # 6. a position word
    words = [t for t in rtoks if t not in _POSITION_FILLER]
    group = next((g for g in _POSITION_GROUPS if len(words) == 1 and words[0] in g), None)
    if group is not None and one and not _blocked(ptoks) and ptoks.count(words[0]) == 1 \
            and not any(t in group and t != words[0] for t in ptoks) and not any(_number(t) for t in ptoks):
        named = set(_tokens(question)) | _POSITION_FILLER | {"hand"}
        if all(t in named for t in ptoks[ptoks.index(words[0]) + 1:]):    # nothing after it but the question's words
            return True
    # 7. a quantity: the same number, the same unit or a unit on one side only
    want = _quantity(rtoks)
    if want is not None and one:
        got = _quantity(_answer_phrase(pred), sentence=True)
        if got is not None and got[0] == want[0] and (got[1] is None or want[1] is None or got[1] == want[1]) \
                and not (want[1] is not None and got[2]):
            return True
    # 8. "no" stated by a negative sentence (not when the question itself negates)
    if r == "no" and one and _negates(pred) and "yes" not in ptoks and not _negates(question) \
            and not any(t in _LISTING for t in ptoks):
        return True
    # 9. an unordered list: the same items in any order
    items = _list_items(rtoks)
    if items and one:
        got = _list_items(_answer_phrase(pred))
        if got and sorted(map(tuple, got)) == sorted(map(tuple, items)):
            return True
    return _cjk_states(pred, ref)


def _quantity(toks: list[str], sentence: bool = False) -> tuple[Decimal, str | None, bool] | None:
    """(value, canonical unit or None, other words follow the number) of the one number `toks` state
    (`_sole_number`); without `sentence`, toks must be exactly [number] or [number, unit]."""
    nums = [i for i, t in enumerate(toks) if _number(t, alone=len(toks) == 1) is not None]
    if len(nums) != 1:
        return None
    i = nums[0]
    after = toks[i + 1:]
    unit = _UNITS.get(" ".join(after[:2])) or (_UNITS.get(after[0]) if after else None)
    if toks[i].endswith("%"):
        unit = "%"
    if not sentence:
        return (_number(toks[i], alone=True), unit, False) if (not after or (unit and len(after) == 1)) and i == 0 else None
    value = _sole_number(toks)
    if value is None:
        return None
    rest = after[1:] if unit and after and after[0] in _UNITS else after
    return value, unit, bool([t for t in rest if t not in _MARKS])


def _list_items(toks: list[str]) -> list[list[str]] | None:
    """The items of a list answer ("red and white", "red, white and blue", "red & white"): two or more
    items of 1..3 words joined by "and", "," or "&"; None for anything else (an "or" is never a list)."""
    if not toks or any(t in ("or", "either", "neither", "nor", "versus", "vs", "/") for t in toks) or _negates(" ".join(toks)):
        return None
    items, cur = [], []
    for t in toks:
        if t in ("and", ",", "&"):
            if cur:
                items.append(cur)
            cur = []
        else:
            cur.append(t)
    items.append(cur)
    if len(items) < 2 or not all(1 <= len(i) <= 3 for i in items):
        return None
    return items


_CJK = re.compile(r"[\u4e00-\u9fff]")
_CJK_COPULA = re.compile(r"(?:答案)?(?:是|为|為)\s*[:：]?\s*(.+)$")


def _cjk_claim(pred: str) -> str | None:
    """A Chinese prediction's answer: the text after its last 是/为 ("伞是黄色的" -> "黄色"; a final 的 and marks
    dropped), or the whole of it; None when it holds no Chinese or negates (不, 没, 非)."""
    text = normalize_answer(_unwrap(pred)).rstrip("的")
    if not _CJK.search(text) or re.search("[\u4e0d\u6ca1\u975e]", text):
        return None
    m = _CJK_COPULA.search(text)
    return (m.group(1) if m else text).strip().rstrip("的").strip()


def _cjk_states(pred: str, ref: str) -> bool:
    """10. a Chinese answer: the prediction's claim (`_cjk_claim`) equals the reference."""
    r = normalize_answer(_unwrap(ref))
    return bool(_CJK.search(r)) and _cjk_claim(pred) == r


def _contains(hay: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(hay[i:i + n] == needle for i in range(len(hay) - n + 1))


def _option_by_text(text: str, choices: list[str], question: str = "") -> int | None:
    """The option a prediction names by its text (no letter), or None:
    1. its normalised text equals an option's: the first such option;
    2. else the options it states (free-form rules 1-10: number, yes/no, sentence ending, reference
       sentence, position, quantity, "no", list, Chinese; `question` for rules 6 and 8): the
       one with the most tokens if exactly one has that many ("It is dark red" names "dark red", not "red");
    3. else its answer phrase (`_answer_phrase`, 1..SHORT_WORDS words, no negation or listing word) is a
       whole-word phrase of exactly one option ('yellow' names "The color of the umbrella is yellow.")."""
    p = normalize_answer(text)
    if not p:
        return None
    for k, option in enumerate(choices):
        if p == normalize_answer(option):
            return k
    stated = [k for k, option in enumerate(choices) if _states(text, option) or _states_more(text, option, question)]
    if stated:
        size = {k: len(_tokens(choices[k])) for k in stated}
        top = [k for k in stated if size[k] == max(size.values())]
        return top[0] if len(top) == 1 else None
    phrase = _answer_phrase(text)
    if 1 <= len(_words(phrase)) <= SHORT_WORDS and not _blocked(phrase):
        inside = [k for k, option in enumerate(choices) if _contains(_tokens(option), phrase)]
        if len(inside) == 1:
            return inside[0]
    return None


# "B", "b", "(B)", "[B]", "B.", "B)", "B:", "Option B", each optionally followed by the option text.
# The bare letter must be followed by space, '.', ':', ')' or the end, so "bed" is not letter b.
_LETTER = re.compile(r"(?:option\s+)?(?:\(([a-z])\)|\[([a-z])\]|([a-z])(?=[\s.:)]|$))[.:)]?\s*(.*)",
                     re.IGNORECASE | re.DOTALL)
# Anywhere in a prediction: a bracketed letter "(B)" / "[b]"; or a letter after a keyword ("The answer is
# B", "Answer: B", "I choose B", "option b."), upper case, or lower case when a mark or the end follows
# ("the answer is a dog" names no letter).
_BRACKETED = re.compile(r"[(\[]([A-Za-z])[)\]]")
_KEYWORD_ZH = re.compile(r"(?:答案(?:是|为|為|应为|應為)?|选择|選擇|选项|選項|选|選)\s*[:：]?\s*[(（]?([A-Za-z])(?![A-Za-z])")
_KEYWORD = re.compile(r"(?i:\b(?:answer|option|choice|choose|select|pick)\b(?:\s+(?:is|would\s+be|should\s+be|"
                      r"will\s+be))?)\s*:?\s*(?:([A-Z])\b|([a-z])(?=[.,;:!?)]|\s*$))")


def _parse_letter(pred: str) -> tuple[int, str] | None:
    """(0-based letter index, text after the letter) if `pred` opens with an option letter."""
    m = _LETTER.fullmatch(pred.strip())
    if m is None:
        return None
    letter = m.group(1) or m.group(2) or m.group(3)
    return ord(letter.lower()) - ord("a"), m.group(4)


def _letter_mentions(pred: str) -> list[tuple[int, str, bool]]:
    """Every option letter `pred` names: (0-based index, the text after it, weak). Weak: a bare letter that
    opens the prediction and is followed by a space and more words ("A red car", "I think ...", "B the
    blue"): it may be an article or a pronoun. Everything else (a whole-prediction letter, "B.", "(B)",
    keyword forms) is strong."""
    s = pred.strip()
    out = []
    m = _LETTER.fullmatch(s)
    if m is not None:
        letter = m.group(1) or m.group(2) or m.group(3)
        weak = bool(m.group(3) and m.group(4) and not s[:6].lower().startswith("option")
                    and s[m.end(3)].isspace())
        out.append((ord(letter.lower()) - ord("a"), m.group(4), weak))
    for m in _BRACKETED.finditer(s):
        out.append((ord(m.group(1).lower()) - ord("a"), s[m.end():], False))
    for m in _KEYWORD.finditer(s):
        out.append((ord((m.group(1) or m.group(2)).lower()) - ord("a"), s[m.end():], False))
    for m in _KEYWORD_ZH.finditer(s):
        out.append((ord(m.group(1).lower()) - ord("a"), s[m.end():], False))
    return out


def choice_index(pred: str, choices: list[str], question: str = "") -> int | None:
    """Which option `pred` names (0-based), or None.
    1. Letters (`_letter_mentions`; the strong ones if any, else the weak one): the prediction names
       option k if every letter it names is k, k < len(choices), and the text after each letter (leading
       marks stripped) is empty or names option k by `_option_by_text` ("B. blue" yes, "(B) red" when B is
       blue: no, "B. purple": no). Two different letters ("A or (B)") name nothing.
    2. A prediction with no letter, or whose only letter is weak and fails rule 1 ("A red car": article),
       is read by its text: `_option_by_text`.
    Before both: a bare letter within range is that position, as `answer_index` reads the answer (options
    that are themselves letters, ["B", "A"]: "A" names the first); otherwise a prediction equal to an
    option's text (normalised) names that option, even when it could be read as a letter ("x" among the
    options "x", "y")."""
    bare = _parse_letter(pred)
    if bare is not None and not bare[1] and bare[0] < len(choices) and re.fullmatch(r"\(?[A-Za-z]\)?\.?", pred.strip()):
        return bare[0]
    exact = [k for k, o in enumerate(choices) if normalize_answer(pred) and normalize_answer(pred) == normalize_answer(o)]
    if exact:
        return exact[0]
    mentions = _letter_mentions(pred)
    strong = [mt for mt in mentions if not mt[2]]
    used = strong or mentions
    if used:
        letters = {k for k, _, _ in used}
        if len(letters) == 1:
            k = letters.pop()
            if k < len(choices) and all(_option_by_text(rest.lstrip(" .,:;)-"), choices, question) == k
                                        for _, rest, _ in used if normalize_answer(rest.lstrip(" .,:;)-"))):
                return k
        if strong:
            return None
    return _option_by_text(pred, choices, question)


def answer_index(answer: str, choices: list[str]) -> int:
    """The correct option: `answer` is a letter ("B", "(B)", "B.": read as a letter whenever it is one
    within range) or an option's text. Neither -> ValueError (a data bug, not a wrong prediction)."""
    parsed = _parse_letter(answer)
    if parsed is not None and not parsed[1] and parsed[0] < len(choices):
        return parsed[0]
    text = normalize_answer(answer)
    for k, option in enumerate(choices):
        if text and text == normalize_answer(option):
            return k
    raise ValueError(f"answer {answer!r} is neither an option letter nor an option of {choices!r}")


def accuracy(pred: str | None, answer: str, choices: list[str] | None = None, question: str = "") -> float:
    """1.0 if `pred` is right, else 0.0. None (no answer) -> 0.0; an empty prediction is never right.
    The prediction is first read as `claim` reads it (wrappers, hedges, a corrected negation).
    Without choices: `pred` states `answer` (the free-form rules in the module docstring; `question`
    only decides whether a negative sentence may answer "no").
    With choices: choice_index(pred) is the correct option; a prediction that names no letter is also
    right if it equals the correct option's text after normalisation (duplicate option texts)."""
    if pred is None or not normalize_answer(pred):
        return 0.0
    pred, answer = claim(pred), _unwrap(answer)
    if not normalize_answer(pred):
        return 0.0
    if not choices:
        return float(_states(pred, answer) or _states_more(pred, answer, question))
    correct = answer_index(answer, choices)
    if choice_index(pred, choices, question) == correct:
        return 1.0
    return float(not _letter_mentions(pred) and normalize_answer(pred) == normalize_answer(choices[correct]))


def vote_key(pred, choices: list[str] | None = None) -> str | None:
    """The canonical answer of a prediction, for majority votes (first rule that applies):
    None           when there is no answer (None, not a string, or empty after normalisation);
    "option:B"     when choices are given and choice_index names an option;
    "number:3"     when the answer phrase (`_answer_phrase`) of a one-sentence prediction states one
                   number (`_sole_number`), written without trailing zeros ("3.0", "three", "There are
                   3 dogs." -> "number:3"; "1,000" -> "number:1000");
    "text:yes"/"text:no"  when the prediction opens with yes/no followed by a mark or nothing, and the
                   other word is absent ("Yes, it is." -> "text:yes");
    "text:<tokens of the answer phrase, space-joined>"  otherwise ("yellow", "Yellow.", "The umbrella is
                   yellow.", "It is yellow", "It's yellow" -> "text:yellow"; "It is not yellow" ->
                   "text:not yellow")."""
    if not isinstance(pred, str) or not normalize_answer(pred):
        return None
    pred = claim(pred)
    if not normalize_answer(pred):
        return None
    if choices:
        k = choice_index(pred, choices)
        if k is not None:
            return f"option:{chr(65 + k)}"
    toks, phrase = _tokens(pred), _answer_phrase(pred)
    if not toks:
        return "text:" + normalize_answer(pred)       # only symbols outside _TOKEN ("—", "%")
    value = _sole_number(phrase) if _one_sentence(pred, toks) else None
    if value is not None:
        return f"number:{value.normalize():f}"
    for word, other in zip(_YES_NO, reversed(_YES_NO)):
        if toks[0] == word and (len(toks) == 1 or toks[1] in _OPENER_MARKS) and other not in toks:
            return f"text:{word}"
    items = _list_items(phrase) if _one_sentence(pred, toks) else None
    if items:
        return "list:" + " | ".join(sorted(" ".join(i) for i in items))
    cjk = _cjk_claim(pred)
    if cjk is not None:
        return "text:" + cjk
    return "text:" + " ".join(phrase)


def same_answer(a, b, choices: list[str] | None = None) -> bool:
    """True if two predictions give the same answer: equal vote keys, neither None. An equivalence
    (reflexive, symmetric, transitive), so votes group without depending on order."""
    key = vote_key(a, choices)
    return key is not None and key == vote_key(b, choices)
