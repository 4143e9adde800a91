"""Shared, vectorised parsing for the file importers, and the one way an importer loads a parsed file.

The pipeline every delimited-text importer follows:

1. :func:`read_input_bytes` reads the file (gzip detected by its magic bytes, not its name);
2. :func:`decode_lines` decodes it robustly and splits it into numbered lines (header = line 1);
3. :func:`split_fields` validates every line against a strict CSV grammar with one vectorised RE2 match,
   then hands only well-formed lines to Arrow's CSV reader, so one broken quote can never swallow the
   lines after it and every parsed row maps back to exactly one file line;
4. ``parse_*`` turn string columns into typed ones with ``errors="coerce"``; :class:`Problems` collects a
   reason per failing line;
5. :func:`load_prepared` runs the copies inside :func:`ml.ingest.batch.load_atomically`.

Nothing here loops over all rows in Python; the few loops run over rejected lines only.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ml.errors import CrmError, InputFileError, WarehouseUnavailable
from ml.ingest.batch import LoadReport, file_sha256, load_atomically

REJECTED_COLUMNS = ["line_no", "raw_text", "reason"]
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
_UTF8_BOM = b"\xef\xbb\xbf"

# One CSV field: unquoted (may hold a quote after its first character, as spreadsheets write `12" RULER`),
# quoted with doubled inner quotes, or empty. A line is well-formed when it is exactly N such fields.
# No field holds a carriage return (Arrow's reader would end the row there) or a NUL byte (PostgreSQL
# text cannot store it): such lines are quarantined, never allowed to fail the whole file.
_FIELD = r'(?:[^",\r\x00][^,\r\x00]*|"(?:[^"\r\x00]|"")*"|)'

INT32_MAX = 2**31 - 1
# raw.* money columns are numeric(14, 4): anything at or above 10^10 would overflow the COPY.
MONEY_MAX_ABS = 1e10


def empty_rejected() -> pd.DataFrame:
    return pd.DataFrame(
        {"line_no": pd.Series(dtype="int64"), "raw_text": pd.Series(dtype="str"), "reason": pd.Series(dtype="str")}
    )


# ---------------------------------------------------------------------------------------------------------
# Reading and decoding
# ---------------------------------------------------------------------------------------------------------
def read_input_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it is gzip. Unreadable or corrupt files are one clear error."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputFileError(f"no such file: {path}") from None
    except OSError as err:
        raise InputFileError(f"cannot read {path}: {err.strerror or err}") from None
    if data.startswith(GZIP_MAGIC):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise InputFileError(f"{path} looks gzipped but cannot be decompressed: {err}") from None
    return data


@dataclass
class Lines:
    """A text file as numbered lines. ``data`` holds the non-blank data lines that decoded cleanly."""

    header: str | None
    data: pd.DataFrame  # columns line_no (1-based, header = 1), text
    rejected: pd.DataFrame  # lines that could not even be decoded
    encoding: str

    @property
    def lines_read(self) -> int:
        return len(self.data) + len(self.rejected)


def decode_lines(data: bytes, *, has_header: bool = True) -> Lines:
    """Decode bytes robustly and number the lines.

    UTF-8 when the file is UTF-8. A file none of whose non-ASCII lines is valid UTF-8 is a legacy 8-bit
    file (the UCI Online Retail file was published as Windows-1252/Latin-1): it is decoded as cp1252, or
    Latin-1 when it holds bytes cp1252 leaves undefined. A file with at least one valid multi-byte UTF-8
    line was written as UTF-8 (legacy text is practically never valid UTF-8 by accident), so its lines that
    are not are corrupt: they are quarantined ("invalid UTF-8 bytes") rather than guessed at, which would
    load mojibake silently. Blank lines carry no data and are neither read nor counted.
    """
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    bad_lines: dict[int, str] = {}
    try:
        text, encoding = data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding, bad_lines = _decode_imperfect(data)

    # \r\n -> \n keeps line numbering intact (the \r never starts a line); a lone \r is kept as text.
    physical = text.replace("\r\n", "\n").split("\n")
    if physical and physical[-1] == "":
        physical.pop()  # the file's final newline ends the last line; it does not start a new one
    header = None
    start = 0
    if has_header:
        if not physical:
            raise InputFileError("the file is empty: expected a header line")
        header, start = physical[0], 1
        if 0 in bad_lines:
            raise InputFileError(f"the header line is not valid text: {bad_lines[0]!r}")
    line_no = np.arange(start + 1, len(physical) + 1, dtype=np.int64)
    texts = pd.Series(physical[start:], dtype="str")
    keep = texts.str.strip().ne("").to_numpy(dtype=bool, copy=True)
    rejected = empty_rejected()
    if bad_lines:
        bad_idx = np.fromiter((i for i in bad_lines if i >= start), dtype=np.int64)
        is_bad = np.isin(np.arange(start, len(physical)), bad_idx)
        keep = keep & ~is_bad
        rejected = pd.DataFrame(
            {
                "line_no": bad_idx + 1,
                "raw_text": pd.Series([bad_lines[i] for i in bad_idx], dtype="str"),
                "reason": "invalid UTF-8 bytes (the file is UTF-8 elsewhere)",
            }
        )
    frame = pd.DataFrame({"line_no": line_no[keep], "text": texts[keep].reset_index(drop=True)})
    return Lines(header=header, data=frame, rejected=rejected, encoding=encoding)


def _decode_imperfect(data: bytes) -> tuple[str, str, dict[int, str]]:
    """Decode a file that is not clean UTF-8: returns (text, encoding, {line index: raw text of bad line})."""
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 0x0A)
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [len(buf)]))
    # Only lines holding a byte >= 0x80 can be anything but ASCII; look at those alone.
    suspects = np.unique(np.searchsorted(newlines, np.flatnonzero(buf >= 0x80)))
    invalid = {}
    for i in suspects:  # loops over non-ASCII lines only, a small share of any real file
        chunk = data[starts[i] : ends[i]]
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            invalid[int(i)] = chunk.rstrip(b"\r").decode("utf-8", errors="backslashreplace")
    if len(suspects) > len(invalid):  # some non-ASCII line is valid UTF-8: the file is UTF-8
        return data.decode("utf-8", errors="replace"), "utf-8", invalid
    try:
        return data.decode("cp1252"), "cp1252", {}
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1", {}


def parse_header(header: str) -> list[str]:
    """The header line's field names (CSV-quoted or not), stripped."""
    try:
        names = next(csv.reader([header], strict=True))
    except (csv.Error, StopIteration):
        names = header.split(",")
    return [n.strip().strip('"').strip() for n in names]


def normalise_name(name: str) -> str:
    """Header matching ignores case, spaces and underscores: ``Customer ID`` == ``CustomerID``."""
    return "".join(name.split()).replace("_", "").casefold()


# ---------------------------------------------------------------------------------------------------------
# Splitting lines into fields
# ---------------------------------------------------------------------------------------------------------
def split_fields(lines: pd.DataFrame, names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split numbered lines into exactly ``len(names)`` string fields each.

    Returns (fields, rejected): ``fields`` has one column per name (stripped strings, empty for empty
    fields) plus ``line_no`` and ``raw_text``; ``rejected`` holds malformed lines with the reason.
    """
    n = len(names)
    if lines.empty:
        empty = pd.DataFrame({name: pd.Series(dtype="str") for name in names})
        return empty.assign(line_no=pd.Series(dtype="int64"), raw_text=pd.Series(dtype="str")), empty_rejected()
    text = pa.array(lines["text"], type=pa.large_string())
    pattern = "^" + _FIELD + ("(?:," + _FIELD + "){" + str(n - 1) + "}" if n > 1 else "") + "$"
    ok = pc.match_substring_regex(text, pattern).to_numpy(zero_copy_only=False)
    bad = lines[~ok]
    rejected = pd.DataFrame(
        {
            "line_no": bad["line_no"].to_numpy(),
            "raw_text": bad["text"].to_numpy(),
            "reason": [_explain_malformed(t, n) for t in bad["text"]],  # rejected lines only
        }
    )
    good = lines[ok].reset_index(drop=True)
    if good.empty:  # Arrow refuses an empty body; every line was malformed
        empty, _ = split_fields(good, names)
        return empty, rejected
    body = "\n".join(good["text"]).encode("utf-8")
    table = pacsv.read_csv(
        io.BytesIO(body),
        read_options=pacsv.ReadOptions(column_names=[f"f{i}" for i in range(n)]),
        # Every line is already known to be exactly n well-quoted fields, so a row can never span lines.
        parse_options=pacsv.ParseOptions(newlines_in_values=False, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            column_types={f"f{i}": pa.string() for i in range(n)}, strings_can_be_null=False
        ),
    )
    if table.num_rows != len(good):  # cannot happen for lines that passed the grammar; never load misaligned rows
        raise RuntimeError(f"CSV reader returned {table.num_rows} rows for {len(good)} validated lines")
    fields = pd.DataFrame(
        {name: pd.Series(pc.utf8_trim_whitespace(table.column(i)).to_pandas(), dtype="str")
         for i, name in enumerate(names)}
    )
    fields["line_no"] = good["line_no"].to_numpy()
    fields["raw_text"] = good["text"].to_numpy()
    return fields, rejected


def _explain_malformed(line: str, expected: int) -> str:
    if "\x00" in line:
        return "NUL byte inside the line"
    if "\r" in line:
        return "carriage return inside the line (a line break that is not a newline)"
    try:
        rows = list(csv.reader([line], strict=True))
    except csv.Error as err:
        return f"broken quotes ({err})"
    got = len(rows[0]) if rows else 0
    if got != expected:
        return f"wrong number of fields: {got} (expected {expected})"
    return "malformed CSV line (text after a closing quote)"


# ---------------------------------------------------------------------------------------------------------
# Typed values
# ---------------------------------------------------------------------------------------------------------
class Problems:
    """Collects, per row, the reasons it cannot be loaded. Vectorised: one call per check, not per row."""

    def __init__(self, n_rows: int):
        self._reason = np.full(n_rows, "", dtype=object)

    def add(self, mask, message: str | pd.Series) -> None:
        mask = np.asarray(pd.Series(mask).fillna(False), dtype=bool)
        if not mask.any():
            return
        msg = message.to_numpy(dtype=object)[mask] if isinstance(message, pd.Series) else message
        current = self._reason[mask]
        self._reason[mask] = np.where(current == "", msg, current + "; " + msg)

    @property
    def bad(self) -> np.ndarray:
        return self._reason != ""

    def reasons(self) -> np.ndarray:
        return self._reason


def quoted(values: pd.Series) -> pd.Series:
    """Values as they appear in a reason: ``'abc'``."""
    return "'" + values.astype("str") + "'"


def parse_integer(values: pd.Series, what: str, problems: Problems) -> pd.Series:
    """Whole numbers (``6``, ``6.0``) as Int64; anything else is a problem and becomes <NA>."""
    number = pd.to_numeric(values, errors="coerce")
    missing = number.isna()
    not_whole = ~missing & (number != np.floor(number))
    too_big = ~missing & ~not_whole & (number.abs() > INT32_MAX)
    problems.add(missing & values.eq(""), f"empty {what}")
    problems.add(missing & values.ne(""), what + " " + quoted(values) + " is not a number")
    problems.add(not_whole, what + " " + quoted(values) + " is not a whole number")
    problems.add(too_big, what + " " + quoted(values) + " is out of range")
    good = ~(missing | not_whole | too_big)
    return number.where(good).astype("Int64")


def parse_money(values: pd.Series, what: str, problems: Problems) -> pd.Series:
    """Decimal amounts as float64 (stored as numeric(14, 4)); unparsable or overflowing ones are problems."""
    number = pd.to_numeric(values, errors="coerce")
    missing = number.isna()
    # Compared after rounding to the column's 4 decimals: 9999999999.99999 rounds to 10^10 and overflows.
    too_big = ~missing & ~(number.round(4).abs() < MONEY_MAX_ABS)  # also catches inf
    problems.add(missing & values.eq(""), f"empty {what}")
    problems.add(missing & values.ne(""), what + " " + quoted(values) + " is not a number")
    problems.add(too_big, what + " " + quoted(values) + " is out of range")
    return number.where(~(missing | too_big))


def parse_timestamp(values: pd.Series, what: str, problems: Problems, *, fmt: str | None = None) -> pd.Series:
    """Timestamps as datetime64; ISO 8601 (``2010-12-01 08:26:00``) or spreadsheet slash dates.

    Slash dates (``12/1/2010 8:26``, as UCI's own CSV export writes them) are month-first unless the file
    shows a first component above 12 and no second one above 12, which only a day-first file can. The
    order is decided once per file, never per value, so one file is never read two ways.
    """
    # utc=True: naive values keep their wall time and values with offsets become UTC, so a file mixing both
    # (or several offsets) parses instead of raising "Mixed timezones detected".
    if fmt is not None:
        parsed = pd.to_datetime(values, format=fmt, errors="coerce", utc=True)
    else:
        parsed = pd.to_datetime(values, format="ISO8601", errors="coerce", utc=True)
        slash = parsed.isna() & values.str.contains("/", regex=False)
        if slash.any():
            parts = values[slash].str.extract(r"^(\d{1,2})/(\d{1,2})/\d{2,4}").astype("float64")
            day_first = bool((parts[0] > 12).any()) and not bool((parts[1] > 12).any())
            date_fmt = "%d/%m/%Y" if day_first else "%m/%d/%Y"
            for time_fmt in (" %H:%M", " %H:%M:%S", ""):
                todo = parsed.isna() & slash
                if not todo.any():
                    break
                attempt = pd.to_datetime(values[todo], format=date_fmt + time_fmt, errors="coerce", utc=True)
                parsed = parsed.mask(todo, attempt)
    parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[us]")
    # pandas reads "now" and "today" as the current clock time: never a date from a file (and not idempotent);
    # and it accepts the year 0, which PostgreSQL (1 BC) refuses.
    parsed = parsed.mask(values.isin(["now", "today"]) | (parsed.dt.year < 1))
    missing = parsed.isna()
    problems.add(missing & values.eq(""), f"empty {what}")
    problems.add(missing & values.ne(""), what + " " + quoted(values) + " is not a date")
    return parsed


def nullable_text(values: pd.Series) -> pd.Series:
    """Empty strings become NULL in the warehouse."""
    return values.where(values.ne(""))


def most_frequent(frame: pd.DataFrame, key: str, value: str) -> pd.Series:
    """Per ``key``, the most frequent non-null ``value``; ties go to the value seen first in the file."""
    pairs = frame.loc[frame[value].notna(), [key, value]]
    counts = pairs.groupby([key, value], sort=False).size().rename("n").reset_index()
    counts = counts.sort_values("n", ascending=False, kind="stable").drop_duplicates(key)
    return counts.set_index(key)[value]


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
@dataclass
class PreparedLoad:
    """A parsed file, ready to COPY: raw tables in load order (primary table first) and the rejected lines."""

    tables: dict[str, pd.DataFrame]
    rejected: pd.DataFrame
    lines_read: int
    notes: dict[str, object] = field(default_factory=dict)


def load_prepared(
    conn: psycopg.Connection,
    path: Path,
    *,
    source: str,
    primary_table: str,
    prepare: Callable[[Path], PreparedLoad],
) -> LoadReport:
    """Load a file as one atomic, idempotent batch.

    The file is read and parsed before the warehouse is touched, so a missing file or an unknown header
    leaves no trace at all. A file already loaded (same source, same SHA-256) is not parsed again.
    Database failures become one clear :class:`CrmError`; the batch is rolled back either way.
    """
    path = Path(path)
    try:
        sha = file_sha256(path)
    except FileNotFoundError:
        raise InputFileError(f"no such file: {path}") from None
    except OSError as err:
        raise InputFileError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        with conn.transaction():
            done = conn.execute(
                "select batch_id from audit.load_batches "
                "where source = %s and content_sha256 = %s and status = 'loaded'",
                [source, sha],
            ).fetchone()
        prepared = prepare(path) if done is None else None

        def fill(batch) -> None:
            data = prepared if prepared is not None else prepare(path)
            batch.report.lines_read = data.lines_read
            tables = iter(data.tables.items())
            batch.copy(*next(tables))  # the primary table, then its rejects, then the tables derived from it
            # PostgreSQL text cannot hold NUL: keep the quarantined line readable as the escape \x00.
            raw_text = data.rejected["raw_text"].astype("str").str.replace("\x00", "\\x00", regex=False)
            batch.quarantine(data.rejected.assign(raw_text=raw_text, target_table=primary_table))
            for table, frame in tables:
                batch.copy(table, frame)

        return load_atomically(
            conn,
            source=source,
            source_name=path.name,
            content_sha256=sha,
            primary_table=primary_table,
            fill=fill,
        )
    except psycopg.OperationalError as err:
        if conn.closed or conn.broken:
            raise WarehouseUnavailable(
                f"lost the warehouse connection while loading {path}: {_first_line(err)}; "
                "the load was rolled back, nothing from this file was loaded"
            ) from err
        raise CrmError(f"the warehouse refused the load of {path}: {_first_line(err)}; rolled back") from err
    except psycopg.Error as err:
        raise CrmError(
            f"the warehouse refused the load of {path}: {_first_line(err)}; "
            "rolled back, nothing from this file was loaded"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
