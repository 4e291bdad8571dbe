"""From what users have to training data: spreadsheets, FAQ documents and other JSONL formats.

    result = convert("faq.csv", to="chat", system="Eres el asistente de ...")
    result = convert("faq.md")                        # headings or bold lines are the questions
    result = convert("data.jsonl", to="sharegpt")     # any supported format to another
    result.examples, result.issues, result.source     # issues are located: PATH:LINE: field

`afinar data convert` writes `result` only when every example converted and the output passes
`afinar validate`; otherwise it lists every problem and writes nothing.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from afinar.data.example import Example, Message
from afinar.data.issues import Issue
from afinar.data.validate import load_examples
from afinar.data.writers import NotExpressible, to_record, with_system
from afinar.errors import AfinarError

# Header names (lower-case, accents kept) that say "question" / "answer" in a spreadsheet.
QUESTION_NAMES = ("question", "questions", "pregunta", "preguntas", "q", "prompt", "input",
                  "user", "consulta", "instruction", "query", "pergunta", "frage")
ANSWER_NAMES = ("answer", "answers", "respuesta", "respuestas", "a", "response", "output",
                "completion", "assistant", "reply", "resposta", "antwort")
TABLE_SUFFIXES = (".csv", ".tsv", ".xlsx")
MARKDOWN_SUFFIXES = (".md", ".markdown")


@dataclass
class Converted:
    source: str  # what was read: "csv (columns pregunta → respuesta)", "markdown FAQ", ...
    examples: list[Example]
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    def records(self, fmt: str) -> list[dict]:
        return [to_record(ex, fmt) for ex in self.examples]


def convert(path: str | Path, to: str = "chat", system: str | None = None,
            question: str | None = None, answer: str | None = None,
            sheet: str | None = None) -> Converted:
    path = Path(path)
    if not path.is_file():
        raise AfinarError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        result = _from_table(path, question, answer, sheet)
    elif suffix in MARKDOWN_SUFFIXES:
        result = _from_markdown(path)
    elif suffix in (".jsonl", ".json"):
        result = _from_jsonl(path)
    else:
        raise AfinarError(f"{path}: cannot convert a {suffix or 'suffix-less'} file",
                          "give a .csv, .tsv, .xlsx, .md or .jsonl file")
    result.examples = [with_system(ex, system) for ex in result.examples]
    _check_expressible(result, to)
    return result


def _check_expressible(result: Converted, to: str) -> None:
    kept = []
    for ex in result.examples:
        try:
            to_record(ex, to)
        except NotExpressible as exc:
            result.issues.append(Issue(ex.path, ex.line, "", f"cannot be written as {to}: {exc}"))
            continue
        kept.append(ex)
    result.examples = kept


# --- spreadsheets -------------------------------------------------------------------------------

def _rows(path: Path, sheet: str | None) -> list[list[str]]:
    if path.suffix.lower() == ".xlsx":
        return _xlsx_rows(path, sheet)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252")  # Excel's "CSV" on Windows; every byte decodes
    if path.suffix.lower() == ".tsv":
        dialect = csv.excel_tab
    else:
        try:
            dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
        except csv.Error:
            dialect = csv.excel
    return [row for row in csv.reader(io.StringIO(text), dialect)]


def _xlsx_rows(path: Path, sheet: str | None) -> list[list[str]]:
    try:
        import openpyxl
    except ImportError:
        raise AfinarError(f"{path}: reading .xlsx needs openpyxl",
                          "pip install 'afinar[xlsx]', or save the sheet as CSV") from None
    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    if sheet is not None and sheet not in book.sheetnames:
        raise AfinarError(f"{path}: no sheet {sheet!r}",
                          f"sheets: {', '.join(book.sheetnames)}")
    rows = book[sheet] if sheet else book.worksheets[0]
    return [["" if cell is None else str(cell) for cell in row]
            for row in rows.iter_rows(values_only=True)]


def _pick_column(header: list[str], wanted: str | None, names: tuple[str, ...], role: str,
                 path: Path) -> int:
    lowered = [h.strip().lower() for h in header]
    if wanted is not None:
        if wanted.strip().lower() in lowered:
            return lowered.index(wanted.strip().lower())
        raise AfinarError(f"{path}: no column {wanted!r} for the {role}s",
                          f"columns: {', '.join(h for h in header if h)}")
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise AfinarError(f"{path}: which column holds the {role}s?",
                      f"pass --{role} COLUMN; columns: {', '.join(h for h in header if h)}")


def _from_table(path: Path, question: str | None, answer: str | None,
                sheet: str | None) -> Converted:
    rows = [row for row in _rows(path, sheet)]
    header_at = next((i for i, row in enumerate(rows) if any(c.strip() for c in row)), None)
    if header_at is None:
        raise AfinarError(f"{path}: the table is empty")
    header = rows[header_at]
    named = [h for h in header if h.strip()]
    if question is None and answer is None and len(named) == 2 and not any(
            h.strip().lower() in QUESTION_NAMES + ANSWER_NAMES for h in named):
        q_col, a_col = header.index(named[0]), header.index(named[1])  # two columns: Q then A
    else:
        q_col = _pick_column(header, question, QUESTION_NAMES, "question", path)
        a_col = _pick_column(header, answer, ANSWER_NAMES, "answer", path)
    shown, issues, examples = str(path), [], []
    for number, row in enumerate(rows[header_at + 1:], start=header_at + 2):
        cells = row + [""] * (max(q_col, a_col) + 1 - len(row))
        q, a = cells[q_col].strip(), cells[a_col].strip()
        if not q and not a:
            continue  # blank rows are common in exported sheets
        for text, column in ((q, header[q_col]), (a, header[a_col])):
            if not text:
                issues.append(Issue(shown, number, column, "is empty",
                                    "fill it in or delete the row"))
        if q and a:
            examples.append(Example((Message("user", q), Message("assistant", a, True)),
                                    path=shown, line=number))
    source = f"{path.suffix.lstrip('.').lower()} (column {header[q_col]!r} → {header[a_col]!r})"
    return Converted(source, examples, issues)


# --- Markdown FAQ -------------------------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BOLD_LINE = re.compile(r"^\s*(?:[-*]\s+)?(\*\*|__)(.+?)\1\s*:?\s*$")
_QA_PREFIX = re.compile(r"^\s*(?:\*\*|__)?\s*(?:Q|P|Pregunta|Question)\s*[:.]\s*(?:\*\*|__)?\s*",
                        re.IGNORECASE)
_A_PREFIX = re.compile(r"^\s*(?:\*\*|__)?\s*(?:A|R|Respuesta|Answer)\s*[:.]\s*(?:\*\*|__)?\s*",
                       re.IGNORECASE)


def _from_markdown(path: Path) -> Converted:
    """Each heading or bold-only line is a question; the text under it, up to the next one, is
    its answer. A heading with nothing under it (a section title such as "# Envíos") is not a
    question. "Q: ..." / "A: ..." prefixes are removed."""
    shown = str(path)
    text = path.read_text(encoding="utf-8-sig")
    blocks: list[tuple[int, str, list[str]]] = []  # (line, question, answer lines)
    fence = False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip().startswith("```"):
            fence = not fence
        heading = None if fence else (_HEADING.match(line) or _BOLD_LINE.match(line))
        if heading is not None:
            blocks.append((number, heading.group(2).strip(), []))
        elif blocks:
            blocks[-1][2].append(line)
    issues, examples = [], []
    for number, q, body in blocks:
        answer = _A_PREFIX.sub("", "\n".join(body).strip(), count=1).strip()
        question = _QA_PREFIX.sub("", q, count=1).strip()
        if not answer:
            continue  # a section title
        if not question:
            issues.append(Issue(shown, number, "question", "is empty",
                                "write the question on the heading line"))
            continue
        examples.append(Example((Message("user", question), Message("assistant", answer, True)),
                                path=shown, line=number))
    if not examples:
        issues.append(Issue(shown, 0, "", "no question with an answer found",
                            "write each question as a heading (## ...) or a **bold** line, "
                            "with its answer below it"))
    return Converted("markdown FAQ (headings and bold lines as questions)", examples, issues)


# --- JSONL in another format --------------------------------------------------------------------

def _from_jsonl(path: Path) -> Converted:
    report = load_examples(path, for_training=False)
    return Converted(f"jsonl ({report.format} format)", report.examples,
                     [i for i in report.issues if i.severity == "error"])
