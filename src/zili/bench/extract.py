"""`zili bench extract`: the extraction workload (issue 20, item 6).

Documents and forms of the kind the product exists for: the examples in examples/ (invoices and
financial reports, with their forms; no true values, so they count for speed only) and documents
generated from fixed seeds with their true field values: invoices and financial summaries in English
and Chinese, and service contracts. Each is sent as a schema-constrained chat request (the prompt
`zili extract` builds, temperature 0); the run reports output tokens/s, requests/s and field
accuracy (exact match of each true field, numbers compared as numbers, strings case- and
space-insensitively), and speculative decoding's figures when the engine speculates.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zili.bench.machine import load_average
from zili.bench.offline import spec_decode_row
from zili.extract import extraction_request


@dataclass(frozen=True)
class ExtractionCase:
    name: str
    document: str
    schema: dict[str, Any]
    truth: dict[str, Any] | None  # None: no true values (speed only)


DATE = {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}
TEXT = {"type": "string", "maxLength": 60}
NUMBER = {"type": "number"}
CURRENCY = {"type": "string", "enum": ["USD", "EUR", "GBP", "CNY", "JPY", "CHF"]}

INVOICE_FORM = {"title": "Invoice", "type": "object", "properties": {
    "invoice_number": TEXT, "issue_date": DATE, "seller": TEXT, "buyer": TEXT, "currency": CURRENCY,
    "tax": NUMBER, "total": NUMBER}, "required": ["invoice_number", "issue_date", "seller", "buyer", "currency",
                                                  "tax", "total"]}
REPORT_FORM = {"title": "Financial summary", "type": "object", "properties": {
    "company": TEXT, "period": TEXT, "currency": CURRENCY, "revenue": NUMBER, "net_income": NUMBER,
    "employees": {"type": "integer"}}, "required": ["company", "period", "currency", "revenue", "net_income",
                                                    "employees"]}
CONTRACT_FORM = {"title": "Service contract", "type": "object", "properties": {
    "provider": TEXT, "client": TEXT, "effective_date": DATE, "term_months": {"type": "integer"},
    "monthly_fee": NUMBER, "currency": CURRENCY, "governing_law": TEXT},
    "required": ["provider", "client", "effective_date", "term_months", "monthly_fee", "currency", "governing_law"]}

_COMPANIES = ["Harbor Logistics Ltd.", "Blue Fern Analytics GmbH", "Northwind Bakery", "Kestrel Robotics Inc.",
              "Silverline Textiles", "Orchid Medical Supplies", "Granite Peak Software", "Meridian Foods AG",
              "Lumen Solar Systems", "Copperleaf Consulting"]
_COMPANIES_ZH = ["华东精密机械有限公司", "深圳蓝海电子科技有限公司", "北京云帆数据服务有限公司", "杭州青禾食品有限公司",
                 "成都启明医疗器械有限公司", "上海远航物流有限公司"]
_ITEMS = ["Consulting hours", "Stainless steel bowl", "Cloud storage (1 TB)", "Safety gloves (box)", "Delivery",
          "Annual support plan", "Laser printer toner", "Server rack rental"]
_LAWS = ["England and Wales", "the State of New York", "Germany", "Switzerland", "Singapore"]


def _date(rng: random.Random) -> str:
    return f"{rng.randint(2021, 2026)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _invoice(rng: random.Random, chinese: bool) -> ExtractionCase:
    seller, buyer = rng.sample(_COMPANIES_ZH if chinese else _COMPANIES, 2)
    currency = "CNY" if chinese else rng.choice(["USD", "EUR", "GBP"])
    number = f"INV-{rng.randint(2021, 2026)}-{rng.randint(1, 9999):04d}"
    date = _date(rng)
    lines = []
    subtotal = 0.0
    for item in rng.sample(_ITEMS, rng.randint(2, 4)):
        qty, price = rng.randint(1, 12), rng.randint(500, 50000) / 100
        subtotal += qty * price
        lines.append((item, qty, price, qty * price))
    rate = rng.choice([0.06, 0.13]) if chinese else rng.choice([0.0, 0.08, 0.2])
    tax = round(subtotal * rate, 2)
    total = round(subtotal + tax, 2)
    if chinese:
        rows = "\n".join(f"{d}    数量 {q}    单价 {p:.2f}    金额 {a:.2f}" for d, q, p, a in lines)
        doc = (f"{seller}\n增值税发票\n\n发票号码：{number}\n开票日期：{date}\n购买方：{buyer}\n"
               f"销售方：{seller}\n\n{rows}\n\n"
               f"合计（不含税）：{subtotal:.2f} 元\n税额（{rate:.0%}）：{tax:.2f} 元\n"
               f"价税合计：{total:.2f} 元（人民币 CNY）\n")
    else:
        rows = "\n".join(f"{d:<28s}{q:>4d}   {currency} {p:>9.2f}   {currency} {a:>9.2f}" for d, q, p, a in lines)
        doc = (f"{seller}\nINVOICE\n\nInvoice number: {number}\nInvoice date: {date}\n\nBill to:\n{buyer}\n\n"
               f"Description                  Qty   Unit price        Amount\n{rows}\n\n"
               f"Subtotal {currency} {subtotal:.2f}\nTax ({rate:.0%}) {currency} {tax:.2f}\n"
               f"Total due {currency} {total:.2f}\n\nPlease pay {seller} within 30 days.\n")
    truth = {"invoice_number": number, "issue_date": date, "seller": seller, "buyer": buyer, "currency": currency,
             "tax": tax, "total": total}
    return ExtractionCase(f"invoice-{'zh' if chinese else 'en'}", doc, INVOICE_FORM, truth)


def _report(rng: random.Random, chinese: bool) -> ExtractionCase:
    company = rng.choice(_COMPANIES_ZH if chinese else _COMPANIES)
    year = rng.randint(2021, 2026)
    quarter = rng.randint(1, 4)
    period = f"{year} Q{quarter}"
    currency = "CNY" if chinese else rng.choice(["USD", "EUR", "CHF"])
    revenue = rng.randint(1000, 90000) / 10
    net = round(revenue * rng.uniform(-0.1, 0.25), 1)
    employees = rng.randint(40, 9000)
    growth = rng.randint(-15, 40)
    if chinese:
        doc = (f"{company} {year}年第{quarter}季度财务摘要（{period}）\n\n"
               f"本季度营业收入为 {revenue} 百万元，同比变动 {growth}%。"
               f"归属于股东的净利润为 {net} 百万元。截至季度末，公司员工人数为 {employees} 人。\n"
               f"管理层预计下一季度收入将保持稳定。所有金额以人民币（CNY）百万元计。\n")
    else:
        doc = (f"{company} - quarterly results, {period}\n\nRevenue for the quarter was {currency} {revenue} million, "
               f"{growth:+d}% year on year. Net income was {currency} {net} million. The company employed "
               f"{employees} people at the end of the quarter. Management expects demand to remain steady next "
               f"quarter. All figures in {currency} million unless stated otherwise.\n")
    truth = {"company": company, "period": period, "currency": currency, "revenue": revenue, "net_income": net,
             "employees": employees}
    return ExtractionCase(f"report-{'zh' if chinese else 'en'}", doc, REPORT_FORM, truth)


def _contract(rng: random.Random) -> ExtractionCase:
    provider, client = rng.sample(_COMPANIES, 2)
    date, months, fee = _date(rng), rng.choice([6, 12, 24, 36]), rng.randint(200, 20000) + 0.0
    currency, law = rng.choice(["USD", "EUR", "GBP"]), rng.choice(_LAWS)
    doc = (f"SERVICE AGREEMENT\n\nThis Service Agreement is made between {provider} (the \"Provider\") and {client} "
           f"(the \"Client\"), effective as of {date}.\n\n1. Services. The Provider shall provide maintenance and "
           f"support services to the Client as described in Schedule A.\n2. Term. This Agreement runs for {months} "
           f"months from the effective date and renews only by written agreement.\n3. Fees. The Client shall pay "
           f"the Provider a monthly fee of {currency} {fee:.2f}, invoiced monthly in arrears.\n4. Governing law. "
           f"This Agreement is governed by the laws of {law}.\n\nSigned for {provider} and for {client}.\n")
    truth = {"provider": provider, "client": client, "effective_date": date, "term_months": months,
             "monthly_fee": fee, "currency": currency, "governing_law": law}
    return ExtractionCase("contract-en", doc, CONTRACT_FORM, truth)


def generated_cases(num: int, seed: int = 0) -> list[ExtractionCase]:
    """`num` documents with their true values, from `seed` (the same seed gives the same documents):
    invoices and financial summaries in English and Chinese, and contracts, in turn."""
    rng = random.Random(seed)
    makers = [lambda: _invoice(rng, False), lambda: _report(rng, False), lambda: _contract(rng),
              lambda: _invoice(rng, True), lambda: _report(rng, True)]
    return [makers[i % len(makers)]() for i in range(num)]


def example_cases(root: Path) -> list[ExtractionCase]:
    """The documents in examples/*/ with their folder's form.json (no true values)."""
    cases = []
    for form in sorted(root.glob("*/form.json")):
        schema = json.loads(form.read_text())
        for doc in sorted(form.parent.glob("*.txt")):
            cases.append(ExtractionCase(f"example-{doc.stem}", doc.read_text(), schema, None))
    return cases


def field_matches(value: Any, truth: Any) -> bool:
    """Numbers compare as numbers (to a cent), strings case- and whitespace-insensitively."""
    if isinstance(truth, (int, float)) and not isinstance(truth, bool):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value - truth) < 0.005
    if isinstance(truth, str) and isinstance(value, str):
        return " ".join(value.split()).casefold() == " ".join(truth.split()).casefold()
    return value == truth


def score_outputs(cases: list[ExtractionCase], outputs: list[tuple[str, str | None]]) -> dict[str, Any]:
    """Field accuracy of finished extractions: `outputs` are (text, finish reason) per case, in order.
    Returns num_requests, fields, fields_correct, field_accuracy (None without true values), unfinished
    (finish reason other than "stop"), invalid_json (texts that do not parse) and the texts."""
    fields = correct = unfinished = invalid = 0
    for case, (text, finish_reason) in zip(cases, outputs, strict=True):
        unfinished += finish_reason != "stop"
        try:
            value = json.loads(text)
        except ValueError:
            value, invalid = {}, invalid + 1
        for key, truth in (case.truth or {}).items():
            fields += 1
            correct += field_matches(value.get(key) if isinstance(value, dict) else None, truth)
    return {"num_requests": len(cases), "fields": fields, "fields_correct": correct,
            "field_accuracy": correct / fields if fields else None, "unfinished": unfinished,
            "invalid_json": invalid, "texts": [text for text, _ in outputs]}


def run_workload(llm: Any, cases: list[ExtractionCase], streams: int, max_tokens: int = 384) -> dict[str, Any]:
    """Run every case through `llm` (zili.LLM), `streams` requests at a time (each group runs to its
    end before the next starts). Returns speed, field accuracy and speculation figures."""

    requests = [extraction_request(llm, c.schema, c.document, max_tokens=max_tokens) for c in cases]
    before = llm.engine.stats()
    load_before = load_average()
    outputs = []
    t0 = time.perf_counter()
    for i in range(0, len(requests), streams):
        group = requests[i:i + streams]
        outputs += llm.generate([p for p, _ in group], [sp for _, sp in group], use_tqdm=False)
    duration = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    row = score_outputs(cases, [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outputs])
    row.update({"streams": streams, "output_tokens": n_out, "duration_s": duration,
                "output_throughput": n_out / duration, "request_throughput": len(cases) / duration,
                "load_average_before": load_before, "load_average_after": load_average()})
    after = llm.engine.stats()
    row["num_steps"] = after.num_steps - before.num_steps  # engine steps (forward passes) the run took
    if getattr(getattr(llm.engine, "speculator", None), "config", None) is not None:  # speculative decoding on
        row["spec_decode"] = spec_decode_row(before, after)
    jump_forward = getattr(llm.engine, "jump_forward", None)
    if jump_forward is not None:
        row["jump_forward"] = jump_forward_row(jump_forward.mode, before, after)
    return row


def jump_forward_row(mode: str, before: Any, after: Any) -> dict[str, Any]:
    """Jump-forward's figures between two EngineStats snapshots: jumps, forced tokens that took no step
    of their own (steps saved), and in "verify" mode forced drafts proposed and their acceptance rate."""
    jumps = after.jump_forward_num_jumps - before.jump_forward_num_jumps
    saved = after.jump_forward_num_forced_tokens - before.jump_forward_num_forced_tokens
    drafted = after.jump_forward_num_forced_draft_tokens - before.jump_forward_num_forced_draft_tokens
    row: dict[str, Any] = {"mode": mode, "num_jumps": jumps, "num_forced_tokens": saved}
    if mode == "verify":
        row.update({"num_forced_draft_tokens": drafted, "num_accepted_forced_tokens": saved,
                    "forced_acceptance_rate": saved / drafted if drafted else None})
    return row
