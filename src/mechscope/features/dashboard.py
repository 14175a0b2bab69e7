"""A self-contained HTML page of an SAE's features: no network, no CDN, one file.

The cards (:class:`~mechscope.features.cards.FeatureCards`, with descriptions and scores when
:mod:`mechscope.features.autointerp` filled them) are embedded as JSON in the page; a small inline script
renders a searchable list of features and, per feature, its activation histogram (inline SVG), top
contexts with each token shaded by the feature's activation there, the tokens its decoder direction
promotes and suppresses, its description and its scores. Every piece of text reaches the page through
``textContent`` (the JSON is escaped for a script element), so token strings cannot inject markup.
The page reads ``#q=<search>&f=<feature>`` from its address, so a link can open a search or a feature.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mechscope.errors import ConfigError
from mechscope.features.cards import FeatureCards
from mechscope.io import write_text_atomic

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh;color:#222}
#side{width:300px;border-right:1px solid #ddd;display:flex;flex-direction:column}
#search{margin:8px;padding:6px;font-size:14px}
#list{overflow-y:auto;flex:1;margin:0;padding:0;list-style:none}
#list li{padding:6px 10px;cursor:pointer;border-bottom:1px solid #f0f0f0;font-size:13px}
#list li.sel{background:#eef3ff}
#main{flex:1;overflow-y:auto;padding:16px 24px}
.ctx{font-family:ui-monospace,monospace;font-size:13px;margin:4px 0;white-space:pre-wrap}
.tok{border-radius:2px}
.tok.top{outline:1px solid #c00}
table{border-collapse:collapse;font-size:13px}td{padding:2px 8px}
.muted{color:#777;font-size:12px}
"""

_SCRIPT = r"""
(function(){
const data = JSON.parse(document.getElementById('data').textContent);
const list = document.getElementById('list'), main = document.getElementById('main');
const search = document.getElementById('search');
function el(tag, text, cls){const e=document.createElement(tag); if(text!==undefined) e.textContent=text; if(cls) e.className=cls; return e;}
function haystack(c){return [String(c.feature), c.description||'', ...(c.top_contexts||[]).flatMap(x=>x.tokens), ...(c.promoted||[]).map(p=>p[0])].join(' ').toLowerCase();}
data.cards.forEach(c=>{c._text=haystack(c);});
function filter(q){q=q.toLowerCase(); let shown=0; for(const li of list.children){const hit=li._card._text.includes(q); li.style.display=hit?'':'none'; if(hit) shown++;} document.getElementById('count').textContent=shown+' of '+data.cards.length+' features';}
function histogram(h){const ns='http://www.w3.org/2000/svg', svg=document.createElementNS(ns,'svg'); svg.setAttribute('width','420'); svg.setAttribute('height','90'); svg.setAttribute('class','hist');
  const counts=(h&&h.counts)||[]; const top=Math.max(1,...counts); const w=420/Math.max(1,counts.length);
  counts.forEach((n,i)=>{const r=document.createElementNS(ns,'rect'); const hh=80*n/top; r.setAttribute('x',String(i*w)); r.setAttribute('y',String(85-hh)); r.setAttribute('width',String(Math.max(1,w-1))); r.setAttribute('height',String(hh)); r.setAttribute('fill','#4a7bd0'); svg.appendChild(r);});
  return svg;}
function show(c){
  for(const li of list.children) li.classList.toggle('sel', li._card===c);
  main.replaceChildren();
  main.appendChild(el('h2','Feature '+c.feature));
  if(c.description) main.appendChild(el('p',c.description,'description'));
  const meta=el('p','fires on '+(100*c.frequency).toFixed(3)+'% of tokens; mean when active '+c.mean_when_active.toFixed(3)+'; max '+c.max_activation.toFixed(3),'muted'); main.appendChild(meta);
  const scores=Object.entries(c.scores||{}); if(scores.length){const t=el('table'); t.className='scores'; scores.forEach(([k,v])=>{const tr=el('tr'); tr.appendChild(el('td',k)); tr.appendChild(el('td',typeof v==='number'?v.toFixed(3):'n/a')); t.appendChild(tr);}); main.appendChild(el('h3','Scores')); main.appendChild(t);}
  main.appendChild(el('h3','Activation histogram (non-zero)')); main.appendChild(histogram(c.histogram));
  main.appendChild(el('h3','Top contexts'));
  const peak=Math.max(1e-9,c.max_activation);
  (c.top_contexts||[]).forEach(x=>{const d=el('div',undefined,'ctx'); x.tokens.forEach((t,i)=>{const s=el('span',t,'tok'); const a=(x.acts||[])[i]||0; if(a>0) s.style.backgroundColor='rgba(255,120,0,'+Math.min(1,a/peak).toFixed(3)+')'; if(i===x.active) s.classList.add('top'); s.title=a.toFixed(3); d.appendChild(s);}); d.appendChild(el('span','  '+x.activation.toFixed(3),'muted')); main.appendChild(d);});
  for(const [name,key] of [['Promoted tokens','promoted'],['Suppressed tokens','suppressed']]){const rows=c[key]||[]; if(!rows.length) continue; main.appendChild(el('h3',name)); const t=el('table'); t.className=key; rows.forEach(([tok,v])=>{const tr=el('tr'); tr.appendChild(el('td',JSON.stringify(tok))); tr.appendChild(el('td',v.toFixed(3))); t.appendChild(tr);}); main.appendChild(t);}
}
data.cards.forEach(c=>{const li=el('li','#'+c.feature+'  '+(c.description||'').slice(0,60)); li._card=c; li.dataset.feature=String(c.feature); li.addEventListener('click',()=>{show(c);}); list.appendChild(li);});
search.addEventListener('input',()=>filter(search.value));
const params=new URLSearchParams(location.hash.slice(1));
if(params.get('q')){search.value=params.get('q'); filter(search.value);} else filter('');
const wanted=data.cards.find(c=>String(c.feature)===params.get('f')) || data.cards.find(c=>true);
if(wanted) show(wanted);
})();
"""  # noqa: E501


def dashboard_html(cards: FeatureCards, *, title: str = "") -> str:
    """The page's HTML text (see the module docstring)."""
    if not len(cards):
        raise ConfigError("expected at least one feature card for the dashboard, got none")
    payload = _finite({"site": cards.site, "cards": [asdict(c) for c in cards]})
    data = json.dumps(payload, allow_nan=False).replace("</", "<\\/").replace("<!--", "<\\!--")
    heading = title or f"SAE features at {cards.site or 'an unnamed site'}"
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(heading)}</title><style>{_STYLE}</style></head><body>"
        f"<div id='side'><input id='search' type='search' placeholder='search features, tokens, descriptions'>"
        f"<div id='count' class='muted' style='margin:0 10px'></div><ul id='list'></ul></div>"
        f"<div id='main'><h1>{html.escape(heading)}</h1></div>"
        f"<script type='application/json' id='data'>{data}</script>"
        f"<script>{_SCRIPT}</script></body></html>"
    )


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None (JSON has no NaN; the page shows "n/a")."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_dashboard(cards: FeatureCards, path: str | Path, *, title: str = "") -> Path:
    """Write the dashboard page of `cards` to `path` (atomically); returns the path."""
    return write_text_atomic(path, dashboard_html(cards, title=title))


__all__ = ["dashboard_html", "write_dashboard"]
