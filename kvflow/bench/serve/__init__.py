"""``kvflow bench serve``: a load generator for any OpenAI-compatible server.

It replays a request stream (random lengths, shared prefixes, an Azure-format trace, or multi-turn
chat sessions) at a chosen arrival process, streams every response, and reports TTFT / TPOT / ITL /
E2E, throughput and goodput, so kvflow's server and its peers (vLLM, ...) are measured by the same
client code.

Modules, one job each:

* ``arrivals``  when each request is sent (Poisson / gamma inter-arrivals, seeded);
* ``trace``     the Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``);
* ``prompts``   text prompts of an exact token count under the served model's tokenizer;
* ``datasets``  request streams: random, shared-prefix, trace;
* ``sessions``  the multi-turn dataset: chat sessions resending their history, turn after turn;
* ``sse``       incremental server-sent-events parsing;
* ``client``    one streamed request -> timings (aiohttp);
* ``runner``    the whole run: discovery, probe, schedule, concurrency cap, progress;
* ``metrics``   latency distributions, throughput, goodput and SLO attainment;
* ``report``    the printed table and the JSON result file;
* ``plots``     PNG latency CDFs, SLO attainment, and multi-run comparisons;
* ``cli``       the ``serve`` and ``serve-plot`` sub-commands of ``kvflow bench``.
"""
