"""Reading and judging LongCoT chess answers with python-chess, by LongCoT's strict rules.

Every reply should end with ``solution = ...``; the payload after the last such
marker is read first, the whole reply second, as LongCoT does:

  integers (piece_combinations, knight_*, max_rooks): the first integer of the
      payload, else the last integer anywhere;
  uci_to_fen: a FEN (bare, or a one-entry / ``final_fen`` dict); compared on
      piece placement only;
  best_move: the first SAN move of the payload, else the last SAN move anywhere;
      compared after stripping ``+ # ! ?``;
  best_3_moves: exactly three SAN moves on the payload's first line (brackets,
      commas and move numbers ignored), else the last ``[a, b, c]`` list, else
      the last three SAN moves; compared in order, suffixes stripped;
  reconstruct_moves: a move dict {"1": "e4 e5", ...} (JSON or Python literal)
      replayed from the start position; every forced move must sit at its
      number, every move must be legal, the final placement must match;
  forced_checkmate: a move dict whose keys and (whitespace-normalised) values
      equal the answer's exactly.

``loose_correct`` is the official SIA implementation's scorer: a list answer is
right when it equals the truth as a set (order ignored).
"""

from __future__ import annotations

import ast
import json
import re

import chess

SAN = (r"(?:O-O-O|O-O|(?:[KQRBN](?:[a-h]|[1-8]|[a-h][1-8])?)?x?[a-h][1-8](?:=[QRBN])?|[a-h]x[a-h][1-8](?:=[QRBN])?)"
       r"[+#]?(?:[!?]{1,2})?")
SAN_TRIPLE = rf"\[\s*({SAN})\s*(?:,\s*|\s+)({SAN})\s*(?:,\s*|\s+)({SAN})\s*\]"
FEN = (r"(?:[pnbrqkPNBRQK1-8]{1,8}/){7}[pnbrqkPNBRQK1-8]{1,8}"
       r"(?:\s+[wb]\s+(?:-|K?Q?k?q?)\s+(?:-|[a-h][36])\s+\d+\s+\d+)?")
INTEGER_TEMPLATES = ("piece_combinations", "knight_path", "knight_path_enemy", "knight_game", "max_rooks")


def payload(text: str) -> str | None:
    """The text after the last ``solution =`` (case-insensitive), or None."""
    matches = list(re.finditer(r"solution\s*=\s*", text, re.IGNORECASE))
    rest = text[matches[-1].end():].strip() if matches else ""
    return rest or None


def first_line(text: str) -> str:
    return text.split("\n")[0].strip()


def strip_suffix(move: str) -> str:
    return re.sub(r"[+#!?]+$", "", move)


def placement(fen: str) -> str | None:
    """The piece-placement field of a valid FEN (full FEN or placement alone), else None."""
    try:
        return chess.Board(fen.strip()).board_fen()
    except ValueError:
        pass
    try:
        board = chess.Board(None)
        board.set_board_fen(fen.strip().split()[0])
        return board.board_fen()
    except (ValueError, IndexError):
        return None


def literal_dict(text: str) -> dict | None:
    """The last ``{...}`` block of ``text`` read as JSON or a Python literal dict."""
    depth, start, blocks = 0, None, []
    for index, char in enumerate(text):
        if char == "{":
            start = index if depth == 0 else start
            depth += 1
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                blocks.append(text[start:index + 1])
    for block in reversed(blocks):
        for reader in (json.loads, ast.literal_eval):
            try:
                value = reader(block)
            except (ValueError, SyntaxError, json.JSONDecodeError):
                continue
            if isinstance(value, dict):
                return value
    return None


def read_integer(text: str) -> int | None:
    found = payload(text)
    match = re.search(r"-?\d+", found) if found else None
    if match:
        return int(match.group(0))
    every = re.findall(r"-?\d+", text)
    return int(every[-1]) if every else None


def read_fen(text: str) -> str | None:
    for candidate in filter(None, (payload(text), text)):
        data = literal_dict(candidate)
        if data:
            value = data.get("final_fen", next(iter(data.values())) if len(data) == 1 else None)
            if value is not None and placement(str(value)) is not None:
                return str(value)
        line = first_line(candidate)
        if placement(line) is not None and "/" in line:
            return line
        matches = re.findall(FEN, candidate)
        if matches and placement(matches[-1]) is not None:
            return matches[-1]
    return None


def read_best_move(text: str) -> list[str] | None:
    found = payload(text)
    moves = re.findall(SAN, found) if found else []
    if moves:
        return [moves[0]]
    every = re.findall(SAN, text)
    return [every[-1]] if every else None


def read_best_3(text: str) -> list[str] | None:
    found = payload(text)
    if found:
        line = first_line(found).strip()
        line = line[1:-1] if line.startswith("[") and line.endswith("]") else line
        tokens = [t for t in re.split(r"[,\s]+", line) if t and not re.fullmatch(r"\d+\.+", t)]
        if len(tokens) == 3 and all(re.fullmatch(SAN, t) for t in tokens):
            return tokens
    triples = re.findall(SAN_TRIPLE, text)
    if triples:
        return list(triples[-1])
    every = re.findall(SAN, text)
    return every[-3:] if len(every) >= 3 else None


def move_dict(value) -> dict[int, tuple[str | None, str | None]] | None:
    """{"12": "Nf3 Nc6"} -> {12: ("Nf3", "Nc6")}; "... e5" is a black move alone."""
    if not isinstance(value, dict) or not value:
        return None
    moves = {}
    for key, text in value.items():
        if not str(key).strip().isdigit():
            return None
        parts = str(text).split()
        if parts[:1] == ["..."] and len(parts) == 2:
            moves[int(key)] = (None, parts[1])
        elif len(parts) in (1, 2):
            moves[int(key)] = (parts[0], parts[1] if len(parts) == 2 else None)
        else:
            return None
    return moves


def read_move_dict(text: str) -> dict[int, tuple[str | None, str | None]] | None:
    for candidate in filter(None, (payload(text), text)):
        moves = move_dict(literal_dict(candidate))
        if moves:
            return moves
    return None


def replay(moves: dict[int, tuple[str | None, str | None]]) -> chess.Board | None:
    board = chess.Board()
    try:
        for number in sorted(moves):
            for move in moves[number]:
                if move is not None:
                    board.push_san(move)
    except ValueError:  # illegal, invalid or ambiguous SAN
        return None
    return board


def strict_correct(item: dict, text: str) -> tuple[bool | None, str]:
    """(True / False, detail), or (None, detail) when nothing answer-like could be read."""
    template, answer = item["template"], item["answer"]
    if template in INTEGER_TEMPLATES:
        value = read_integer(text)
        if value is None:
            return None, "no integer"
        return value == int(re.search(r"-?\d+", str(answer)).group(0)), f"read {value}"
    if template == "uci_to_fen":
        fen = read_fen(text)
        if fen is None:
            return None, "no valid FEN"
        return placement(fen) == placement(str(answer)), f"read {fen}"
    if template in ("best_move", "best_3_moves"):
        moves = read_best_move(text) if template == "best_move" else read_best_3(text)
        if not moves:
            return None, "no SAN move"
        expected = answer if isinstance(answer, list) else [answer]
        return [strip_suffix(m) for m in moves] == [strip_suffix(str(m)) for m in expected], f"read {moves}"
    if template == "reconstruct_moves":
        moves = read_move_dict(text)
        if moves is None:
            return None, "no move dict"
        forced = move_dict(item["problem"].get("forced_moves", {})) or {}
        for number, (white, black) in forced.items():
            given = moves.get(number)
            if given is None or (white and given[0] != white) or (black and given[1] != black):
                return False, f"forced move {number} missing"
        board = replay(moves)
        if board is None:
            return False, "illegal move in the line"
        return board.board_fen() == placement(item["problem"]["final_fen"]), "replayed"
    if template == "forced_checkmate":
        moves = read_move_dict(text)
        if moves is None:
            return None, "no move dict"
        normalise = lambda d: {str(k): " ".join(str(v).split()) for k, v in d.items()}  # noqa: E731
        given = normalise(literal_dict(payload(text) or text) or {})
        return given == normalise(answer), "compared"
    raise ValueError(f"unknown LongCoT chess template {template!r}")


def loose_correct(item: dict, text: str) -> bool:
    """The official SIA task's scorer: a list answer matches the truth as a set."""
    answer = item["answer"]
    if item["template"] == "best_3_moves":
        moves = read_best_3(text)
        return moves is not None and {strip_suffix(m) for m in moves} == {strip_suffix(str(m)) for m in answer}
    verdict, _ = strict_correct(item, text)
    return bool(verdict)
