"""The dashboard's HTML, rendered on the server: plain functions from the reports to
strings. Every value that comes from the database goes through :func:`e` (task titles,
payloads, results, errors, worker metadata and event data are whatever an agent wrote:
attacker-controlled text), and the page's script writes what it receives with
``textContent`` only, never as HTML.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from urllib.parse import quote

import msgspec

from ..cli.report import PlanReport, PlanSummary, StatusReport, SubtaskView, TaskReport
from ..messages.events import Event
from ..messages.tasks import Task
from ..messages.workers import Worker

__all__ = ["e", "layout"]

#: The subtask/task statuses drawn, each with its colour (the legend's order).
COLOURS = {
    "pending": "#9aa5b1",
    "blocked": "#9aa5b1",
    "queued": "#7aa7e0",
    "ready": "#7aa7e0",
    "assigned": "#e0b84f",
    "running": "#e0934f",
    "completed": "#4caf72",
    "failed": "#d9534f",
    "timed_out": "#b5446e",
    "cancelled": "#6c757d",
    "skipped": "#6c757d",
}


def e(value: object) -> str:
    """``value`` as HTML text (quotes too, so that it is safe in an attribute)."""
    return html.escape("" if value is None else str(value), quote=True)


def _when(moment: datetime | float | None) -> str:
    if moment is None:
        return ""
    if isinstance(moment, float | int):
        moment = datetime.fromtimestamp(moment, UTC)
    return e(moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"))


def _ago(moment: datetime | None, now: float | None = None) -> str:
    if moment is None:
        return ""
    seconds = max(0.0, (time.time() if now is None else now) - moment.timestamp())
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _json(value: object) -> str:
    return e(json.dumps(msgspec.to_builtins(value), indent=2, ensure_ascii=False))


def _task_link(task_id: str | None, text: object = None) -> str:
    if task_id is None:
        return ""
    return f'<a href="tasks/{e(quote(task_id, safe=""))}">{e(text if text else task_id)}</a>'


def _plan_link(plan_id: str | None, text: object = None) -> str:
    if plan_id is None:
        return ""
    return f'<a href="plans/{e(quote(plan_id, safe=""))}">{e(text if text else plan_id)}</a>'


def _status(status: object) -> str:
    text = e(getattr(status, "value", status))
    return f'<span class="st st-{text}">{text}</span>'


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], empty: str = "none") -> str:
    """A table of cells already rendered (escaped)."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(head)}" class="empty">{e(empty)}</td></tr>'
    header = "".join(f"<th>{e(h)}</th>" for h in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2733;background:#f6f8fa}
header{background:#1d2733;color:#fff;padding:8px 16px;display:flex;gap:18px;align-items:center}
header a{color:#cfe3ff;text-decoration:none}header b{color:#fff;margin-right:12px}
main{padding:12px 16px}h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:18px 0 6px}
table{border-collapse:collapse;background:#fff;min-width:40%}
td,th{border:1px solid #d8dee4;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4}td.empty{color:#888}pre{background:#fff;border:1px solid #d8dee4;
padding:6px;max-width:100%;overflow:auto;white-space:pre-wrap;word-break:break-all}
.st{padding:1px 6px;border-radius:8px;color:#fff;background:#9aa5b1}
.cards{display:flex;gap:10px;flex-wrap:wrap}.card{background:#fff;border:1px solid #d8dee4;
padding:8px 12px;min-width:90px}.card b{display:block;font-size:22px}
.live{font-size:12px;color:#7a8}#tail td{font-family:ui-monospace,monospace;font-size:12px}
form.filter input{width:160px}svg text{font:12px system-ui,sans-serif}.nw{white-space:nowrap}
.st-draft{background:#9aa5b1}.st-approved{background:#7aa7e0}.st-executing{background:#e0934f}
.st-active,.st-idle{background:#4caf72}.st-busy{background:#e0934f}.st-offline{background:#6c757d}
""" + "".join(f".st-{name}{{background:{colour}}}" for name, colour in COLOURS.items())

#: The page's script: reload <main> (rendered by the server) shortly after events that
#: concern it; a plan's nodes are recoloured at once; the event tail appends rows. Text
#: from events is set with textContent.
_SCRIPT = """
(function(){
const root=document.body.dataset, colours=__COLOURS__;
const src=root.stream; if(!src) return;
const live=document.getElementById('live');
const es=new EventSource(src);
es.onopen=()=>{if(live) live.textContent='live'};
es.onerror=()=>{if(live) live.textContent='reconnecting…'};
let pending=null;
function refresh(){ if(pending) return; pending=setTimeout(async()=>{pending=null;
  const r=await fetch(location.href,{headers:{'X-Fragment':'1'}});
  if(r.ok){document.querySelector('main').innerHTML=await r.text();}},700);}
es.onmessage=(m)=>{
  const ev=JSON.parse(m.data);
  if(root.page==='plan'){
    const st=ev.data&&ev.data.status;
    if(ev.task_id&&st){
      for(const g of document.querySelectorAll('g.node')){
        if(g.dataset.taskId===ev.task_id){g.dataset.status=st;
          g.querySelector('rect').setAttribute('fill',colours[st]||'#9aa5b1');
          g.querySelector('text.status').textContent=st;}}}
    const ended=['completed','failed','cancelled','timed_out'].includes(st);
    if(ev.type.startsWith('plan.')||ended) refreshSide();
    return;}
  if(root.page==='events'){
    const body=document.querySelector('#tail tbody'); if(!body) return;
    for(const empty of body.querySelectorAll('td.empty')) empty.parentElement.remove();
    const tr=document.createElement('tr');
    const when=new Date(ev.timestamp*1000).toISOString().replace('T',' ').slice(0,19);
    for(const [v,link] of [[ev.seq],[when],[ev.type],[ev.source],[ev.task_id,'tasks/'],
      [ev.plan_id,'plans/'],[ev.worker_id],[JSON.stringify(ev.data)]]){
      const td=document.createElement('td');
      if(link&&v){const a=document.createElement('a');a.href=link+encodeURIComponent(v);
        a.textContent=v;td.appendChild(a);} else td.textContent=v==null?'':String(v);
      tr.appendChild(td);}
    tr.dataset.seq=ev.seq; body.prepend(tr);
    while(body.rows.length>500) body.deleteRow(body.rows.length-1);
    return;}
  refresh();
};
function refreshSide(){ if(pending) return; pending=setTimeout(async()=>{pending=null;
  const r=await fetch(location.href,{headers:{'X-Fragment':'side'}});
  const side=document.getElementById('side');
  if(r.ok&&side){side.innerHTML=await r.text();}},300);}
})();
""".replace("__COLOURS__", json.dumps(COLOURS))


def layout(title: str, body: str, *, page: str, stream: str | None, base: str = "/") -> str:
    """A whole page: the navigation, ``body`` (already escaped) and the live script.
    Links are relative to ``base`` (the dashboard's root, wherever it is mounted)."""
    nav = "".join(
        f'<a href="{href}">{e(text)}</a>'
        for href, text in (
            ("./", "Overview"),
            ("queues", "Queues"),
            ("workers", "Workers"),
            ("plans", "Plans"),
            ("events", "Events"),
            ("metrics", "Metrics"),
        )
    )
    stream_attr = f' data-stream="{e(stream)}"' if stream else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f'<base href="{e(base)}">'
        f"<title>{e(title)} · hive-orchestration</title><style>{_STYLE}</style></head>"
        f'<body data-page="{e(page)}"{stream_attr}><header><b>hive-orchestration</b>{nav}'
        '<span class="live" id="live"></span></header>'
        f"<main>{body}</main><script>{_SCRIPT}</script></body></html>"
    )


# -- the pages' bodies ---------------------------------------------------------------


def overview(
    report: StatusReport,
    throughput: dict[str, float],
    percentiles: dict[str, float],
    failures: Sequence[Task],
) -> str:
    cards = "".join(
        f'<div class="card">{_status(status)}<b>{count}</b></div>'
        for status, count in report.tasks.items()
    )
    rate = _table(
        ["final status", "tasks per minute (last 5 min, or since the dashboard started)"],
        [[_status(s), f"{r:.1f}"] for s, r in sorted(throughput.items())],
        "no task has finished since the dashboard started",
    )
    lat = _table(
        ["percentile", "run seconds"],
        [[e(p), f"{v:.3f}"] for p, v in percentiles.items()],
        "no run has ended since the dashboard started",
    )
    failed = _table(
        ["task", "type", "error", "when"],
        [
            [
                _task_link(t.id, t.title),
                e(t.task_type),
                e((t.error or "")[:200]),
                _when(t.updated_at),
            ]
            for t in failures
        ],
    )
    plans = _table(
        ["plan", "progress", "started"],
        [
            [
                _plan_link(p.id, p.title),
                f"{p.progress.done}/{p.progress.total}",
                _when(p.started_at),
            ]
            for p in report.plans
        ],
    )
    return (
        f"<h1>Overview</h1><p>{e(report.db)} · schema {report.schema_version} · last event"
        f" {report.last_seq} · {report.total_tasks} tasks</p>"
        f'<div class="cards" id="counts">{cards}</div>'
        f"<h2>Throughput</h2>{rate}<h2>Run latency</h2>{lat}"
        f"<h2>Recent failures</h2>{failed}<h2>Executing plans</h2>{plans}"
    )


def queues(queued: Sequence[Task], capped: bool, created_rate: dict[str, float]) -> str:
    now = time.time()
    by_type: dict[str, list[Task]] = {}
    for task in queued:
        by_type.setdefault(task.task_type, []).append(task)
    rows = []
    for task_type, tasks in sorted(by_type.items()):
        oldest = min(tasks, key=lambda t: t.updated_at)
        rows.append(
            [
                e(task_type),
                str(len(tasks)) + ("+" if capped else ""),
                _ago(oldest.updated_at, now),
                f"{created_rate.get(task_type, 0.0):.1f}",
                _task_link(oldest.id, oldest.title),
            ]
        )
    note = (
        "<p>More queued tasks than one read returns: the depths are lower bounds.</p>"
        if capped
        else ""
    )
    return (
        "<h1>Queues</h1>"
        + note
        + _table(
            ["task type", "depth", "oldest waiting since", "created per minute", "oldest"],
            rows,
            "nothing is queued",
        )
    )


def workers(listed: Sequence[Worker]) -> str:
    rows = [
        [
            e(w.id),
            e(w.role),
            _status(w.status),
            _ago(w.last_heartbeat),
            _task_link(w.current_task_id),
            e(", ".join(w.capabilities)),
            _when(w.registered_at),
        ]
        for w in listed
    ]
    return "<h1>Workers</h1>" + _table(
        ["worker", "role", "status", "last heartbeat", "current task", "capabilities", "since"],
        rows,
        "no worker has registered",
    )


def _event_rows(events: Iterable[Event]) -> list[list[str]]:
    return [
        [
            str(ev.seq),
            f'<span class="nw">{_when(ev.timestamp)}</span>',
            e(ev.type),
            e(ev.source),
            _task_link(ev.task_id),
            _plan_link(ev.plan_id),
            e(ev.worker_id),
            e(json.dumps(ev.data, ensure_ascii=False)[:400]),
        ]
        for ev in events
    ]


_EVENT_HEAD = ["seq", "time", "type", "source", "task", "plan", "worker", "data"]


def task(report: TaskReport) -> str:
    t = report.task
    fields = [
        ("id", e(t.id)),
        ("title", e(t.title)),
        ("type", e(t.task_type)),
        ("status", _status(t.status)),
        ("priority", e(t.priority)),
        ("attempts", f"{t.attempts} of {t.max_retries + 1}"),
        ("worker", e(t.assigned_worker)),
        ("plan", _plan_link(t.plan_id)),
        ("correlation", e(t.correlation_id)),
        ("source", e(t.source_agent)),
        ("created", _when(t.created_at)),
        ("updated", _when(t.updated_at)),
    ]
    runs = _table(
        ["run", "worker", "status", "started", "ended", "error"],
        [
            [
                str(r.run_number),
                e(r.worker_id),
                _status(r.status),
                _when(r.started_at),
                _when(r.completed_at),
                e(r.error),
            ]
            for r in report.runs
        ],
    )
    outcome = ""
    if t.result is not None:
        outcome += f"<h2>Result</h2><pre>{_json(t.result)}</pre>"
    if t.error is not None:
        outcome += f"<h2>Error</h2><pre>{e(t.error)}</pre>"
    return (
        f"<h1>Task {e(t.title)}</h1>"
        + _table(["field", "value"], [[e(k), v] for k, v in fields])
        + f"<h2>Payload</h2><pre>{_json(t.payload)}</pre>"
        + outcome
        + f"<h2>Runs</h2>{runs}<h2>Events</h2>"
        + _table(_EVENT_HEAD, _event_rows(reversed(report.events)))
    )


def plans(summaries: Sequence[PlanSummary]) -> str:
    rows = [
        [
            _plan_link(p.id, p.title),
            _status(p.status),
            f"{p.progress.done}/{p.progress.total} ({p.progress.percent:.0f}%)",
            e(p.source_agent),
            _when(p.generated_at),
            e(p.error),
        ]
        for p in summaries
    ]
    return "<h1>Plans</h1>" + _table(
        ["plan", "status", "done", "source", "created", "error"], rows, "no plan yet"
    )


#: The DAG's geometry, in pixels: a column per dependency layer.
_W, _H, _COL, _ROW, _PAD = 170, 46, 230, 62, 20


def dag(layers: Sequence[Sequence[SubtaskView]]) -> str:
    """The plan's DAG as inline SVG: a column per dependency layer, an arrow from each
    dependency, each node filled with its task's status (its subtask's before it has a
    task) and carrying its task id, so that the page's script recolours it live."""
    where: dict[str, tuple[int, int]] = {}
    for col, layer in enumerate(layers):
        for row, node in enumerate(layer):
            where[node.id] = (_PAD + col * _COL, _PAD + row * _ROW)
    width = _PAD * 2 + max(len(layers) - 1, 0) * _COL + _W
    height = _PAD * 2 + max((len(layer) for layer in layers), default=1) * _ROW
    edges = []
    for layer in layers:
        for node in layer:
            x, y = where[node.id]
            for dep in node.dependencies:
                if dep in where:
                    dx, dy = where[dep]
                    edges.append(
                        f'<line x1="{dx + _W}" y1="{dy + _H // 2}" x2="{x}" y2="{y + _H // 2}"'
                        ' stroke="#8895a3" stroke-width="1.5" marker-end="url(#arrow)"/>'
                    )
    nodes = []
    for layer in layers:
        for node in layer:
            x, y = where[node.id]
            status = node.task_status.value if node.task_status is not None else node.status
            fill = COLOURS.get(status, "#9aa5b1")
            label = node.id if len(node.id) <= 22 else node.id[:21] + "…"
            task_attr = f' data-task-id="{e(node.task_id)}"' if node.task_id else ""
            body = (
                f'<rect x="{x}" y="{y}" width="{_W}" height="{_H}" rx="6" fill="{fill}"/>'
                f'<text x="{x + 8}" y="{y + 18}" fill="#fff" font-weight="bold">{e(label)}</text>'
                f'<text class="status" x="{x + 8}" y="{y + 36}" fill="#fff">{e(status)}</text>'
                f"<title>{e(node.id)} ({e(node.task_type)})</title>"
            )
            if node.task_id:
                body = f'<a href="tasks/{e(quote(node.task_id, safe=""))}">{body}</a>'
            nodes.append(
                f'<g class="node" data-subtask="{e(node.id)}" data-status="{e(status)}"'
                f"{task_attr}>{body}</g>"
            )
    return (
        f'<svg id="dag" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}"><defs><marker id="arrow" viewBox="0 0 10 10"'
        ' refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto">'
        '<path d="M0,0L10,5L0,10z" fill="#8895a3"/></marker></defs>'
        + "".join(edges)
        + "".join(nodes)
        + "</svg>"
    )


def plan_side(report: PlanReport) -> str:
    """What the plan page refreshes from the server: its status and progress."""
    p, progress = report.plan, report.progress
    counts = ", ".join(f"{e(k)} {v}" for k, v in progress.counts.items())
    error = f"<pre>{e(p.error)}</pre>" if p.error else ""
    return (
        f"<p>{_status(p.status)} · {progress.done}/{progress.total} done"
        f" ({progress.percent:.0f}%) · {counts}</p>{error}"
    )


def plan(report: PlanReport) -> str:
    legend = " ".join(_status(name) for name in COLOURS)
    return (
        f"<h1>Plan {e(report.plan.title)}</h1><p>{e(report.plan.id)}</p>"
        f'<div id="side">{plan_side(report)}</div>{dag(report.layers)}'
        f"<p>{legend}</p>"
    )


def events(recent: Sequence[Event], query: dict[str, str]) -> str:
    inputs = "".join(
        f'<label>{e(label)} <input name="{name}" value="{e(query.get(name, ""))}"></label> '
        for name, label in (
            ("pattern", "type pattern"),
            ("task_id", "task"),
            ("plan_id", "plan"),
            ("correlation_id", "correlation"),
        )
    )
    return (
        '<h1>Events</h1><form class="filter" method="get">'
        f'{inputs}<button type="submit">filter</button></form><div id="tail">'
        + _table(_EVENT_HEAD, _event_rows(reversed(recent)), "no event yet")
        + "</div>"
    )


def refused(reason: str, base: str = "/") -> str:
    body = f"<h1>Refused</h1><p>{e(reason)}</p>"
    return layout("Refused", body, page="refused", stream=None, base=base)
