#!/usr/bin/env bash
# `make mutants`: a mutation run (mutmut) over the code that carries genflow's promises, in
# groups: core (ranking and pairs, pass@k, config validation, resume markers, atomic writes,
# error rows), secrets (the secrets a job holds, their scrubbing and redaction, the manifest),
# requests (the OpenAI-protocol request path, budget and cost), journal (answers a rerun does
# not pay for again), judge (the LLM judge's verdicts and tokens, pairwise ranking) and
# labelling (scorer and human agreement, Label Studio). A developer's tool, not part of CI.
# It prints every surviving mutant (with its diff) and the score: killed / mutants in scope.
#
# mutmut imports the mutated copy through the sys.path entry it puts first; the editable
# install maps genflow.plugins to plugins/ and genflow.flows to flows/, which would reach
# around that copy. So the run works in a staging folder laid out as the installed
# package (genflow/, genflow/plugins/, genflow/flows/) where every mutated module is the
# one the tests import; mutmut's own forced-fail check proves it before any mutant runs.
#
#   make mutants                                   every group below (two hours or more on 2 shared cores:
#                                                  secrets 6 min, costs 5, journal 4, judge 8 in Dec 2026;
#                                                  requests and labelling 30-40 each)
#   make mutants GROUP=secrets                     one group (core secrets requests costs journal judge labelling)
#   make mutants GROUP="judge labelling"           several
#   make mutants MUTATE="plugins/code/passk.py"         one module (with the fast tests of the chosen groups)
#   make mutants MUTATE=... TESTS="tests/x.py"     and the tests to select from
#   make mutants GROUP=judge DIFFS=0               survivors by name, without their diffs (faster)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${BIN:-$ROOT/.venv/bin}
MUTMUT_VERSION=3.8.1

# What is mutated, by group: files as they are in this repository, each optionally followed
# by ":" and a comma-separated list of its functions (a class name takes all its methods,
# Class.method one). The one place to update when a module or a function moves
# (plugins/x.py is genflow.plugins.x); a name that is no longer in its file stops the run.
declare -A GROUP_MUTATE GROUP_TESTS GROUP_K
# ranking and pairs, pass@k, config validation, resume markers, atomic writes, error rows
GROUP_MUTATE[core]="
  genflow/stages/rank.py:combine_scores,rank_candidates,rankings_table
  plugins/training_data/exporters.py
  plugins/code/passk.py
  genflow/config.py
  genflow/data/resume.py:finished,mark_finished,DoneIndex,StageOutcome
  genflow/stages/common.py:error_row,write_part,finish_model_stage
  genflow/data/storage.py:Storage.write_bytes,Storage.write_table,Storage.remove_temporaries,Storage.list
"
GROUP_TESTS[core]="tests/unit/test_promises.py tests/unit/test_ranking.py tests/plugins/test_passk.py tests/unit/test_config.py"
# redaction: the secrets a job holds and their scrubbing, the config's redaction, a sweep's
# row of values, the manifest
GROUP_MUTATE[secrets]="
  genflow/secrets.py
  genflow/config.py:redacted,hides_secrets,redacted_urls,_two_credentials,_strings,job_secrets
  genflow/data/results.py:scrub_result
  genflow/outputs/artifacts.py:sweep_row
  genflow/outputs/manifest.py
"
GROUP_TESTS[secrets]="tests/unit/test_secrets.py tests/unit/test_redaction.py tests/unit/test_manifest.py tests/unit/test_config.py tests/jobs/test_artifacts.py
  tests/unit/test_promises.py"
# the OpenAI-protocol request path: concurrency, rate limits, retries, the calls' answers
GROUP_MUTATE[requests]="
  genflow/engine/requesting.py
  genflow/stages/common.py:Pack,_request_answers,_fan_out
"
GROUP_TESTS[requests]="tests/unit/test_requesting.py tests/unit/test_request_worker.py tests/unit/test_request_answers.py
  tests/jobs/test_request_path.py tests/unit/test_calls.py tests/unit/test_budget.py tests/unit/test_journal_replay.py
  tests/unit/test_promises.py"
# what requests cost and the budget (max_cost) that stops them
GROUP_MUTATE[costs]="
  genflow/engine/budget.py
  genflow/stages/common.py:Usage
"
GROUP_TESTS[costs]="tests/unit/test_budget.py tests/unit/test_request_costs.py tests/unit/test_requesting.py tests/jobs/test_request_path.py
  tests/unit/test_promises.py"
# the journal of answers a rerun does not pay for again, and what a rerun skips
GROUP_MUTATE[journal]="
  genflow/data/journal.py
  genflow/data/resume.py
  genflow/stages/common.py:_journaled_answers,Journals,open_journal
"
GROUP_TESTS[journal]="tests/unit/test_journal.py tests/unit/test_journal_replay.py tests/jobs/test_resume.py
  tests/unit/test_resume_markers.py tests/unit/test_budget.py tests/unit/test_promises.py"
# the LLM judge's verdicts and tokens, and the pairwise ranking it feeds
GROUP_MUTATE[judge]="
  plugins/judge/llm_judge.py:Question,from_probabilities,judge_seed,_cut,_unreadable_error,_split,Judging,_token_count,served_logprobs,summarize_judgements
  plugins/judge/rubrics.py:delimiter_nonce,delimit,quoted_spans,without_quotes,_json_objects,_key_at,_in_scale,_outside,read_rating,read_verdict,expected_rating
  plugins/judge/pairwise.py
"
GROUP_TESTS[judge]="tests/plugins/test_llm_judge.py tests/plugins/test_judge_verdicts.py tests/plugins/test_judge_reading.py
  tests/plugins/test_judge_figures.py tests/unit/test_ranking.py"
# the local judge's tests load a model in each mutant's process (10 s a time); the served
# judge's and the readers' tests reach the same questions, verdicts and tokens
GROUP_K[judge]="not local_judge"
# how scorers agree, human labels and their round trip through Label Studio
GROUP_MUTATE[labelling]="
  genflow/outputs/agreement.py
  genflow/labelling/labels.py
  genflow/outputs/report/sections.py:human_sections
  plugins/labelling/label_studio.py
  plugins/training_data/exporters.py:PreferencePairs.export_human,BestOfN.export_human
"
GROUP_TESTS[labelling]="tests/unit/test_agreement.py tests/unit/test_labelling.py tests/plugins/test_label_studio.py
  tests/unit/test_label_report.py tests/unit/test_label_tasks.py tests/plugins/test_label_studio_api.py
  tests/unit/test_label_pull.py tests/plugins/test_human_exports.py"
ALL_GROUPS="core secrets requests costs journal judge labelling"

GROUP=${*:-${GROUP:-$ALL_GROUPS}}   # `bash scripts/mutants.sh secrets judge` names groups too
[ "$GROUP" = all ] && GROUP=$ALL_GROUPS
group_mutate="" group_tests="" group_k=""
for g in $GROUP; do
    if [ -z "${GROUP_MUTATE[$g]+set}" ]; then
        echo "GROUP: no group '$g' (the groups: $ALL_GROUPS)" >&2
        exit 2
    fi
    group_mutate+="${GROUP_MUTATE[$g]}"
    group_tests+=" ${GROUP_TESTS[$g]}"
    group_k+="${GROUP_K[$g]:+ and ${GROUP_K[$g]}}"
done
echo "mutants of: $GROUP${MUTATE:+ (only MUTATE: $MUTATE)}"
STAGE=${STAGE:-$ROOT/.mutants-${GROUP// /-}}   # a folder per group: runs of two groups keep their results apart
MUTATE=${MUTATE:-$group_mutate}
# The fast tests (no Ray, no Prefect): for each mutant mutmut runs those that reach its function.
# A file not (yet) in tests/ is left out.
TESTS=${TESTS:-$group_tests}
TESTS_K=${TESTS_K:-"${group_k# and }"}   # pytest -k, where a group leaves tests out by name

if ! "$BIN/python" -c "import mutmut, sys; sys.exit(mutmut.__version__ != '$MUTMUT_VERSION')" 2>/dev/null; then
    "$BIN/pip" install -q "mutmut==$MUTMUT_VERSION"
fi

rm -rf "$STAGE"
mkdir -p "$STAGE"
cp -R genflow "$STAGE/genflow"
cp -R plugins "$STAGE/genflow/plugins"
cp -R flows "$STAGE/genflow/flows"
cp -R tests configs benchmarks pyproject.toml "$STAGE/"
find "$STAGE" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -rf "$STAGE/genflow/templates/__pycache__"

"$BIN/python" - "$STAGE" "$MUTATE" "$TESTS" "$TESTS_K" <<'EOF'
import re
import sys
from pathlib import Path

stage, mutate, tests, tests_k = sys.argv[1:]
files, globs = [], []
for entry in mutate.split():
    path, _, functions = entry.partition(":")
    if path.startswith(("plugins/", "flows/")):
        path = "genflow/" + path
    if not (Path(stage) / path).is_file():
        sys.exit(f"MUTATE: {entry}: no such file")
    source = (Path(stage) / path).read_text()
    for name in functions.split(",") if functions else []:
        cls, _, method = name.rpartition(".")
        if not re.search(rf"^(class {cls}\b[\s\S]*?^    (async )?def {method}\(|^class {name}\b)" if cls else
                         rf"^((async )?def|class) {name}\b", source, re.M):
            sys.exit(f"MUTATE: {entry}: {path} has no {name} (moved or renamed? update scripts/mutants.sh)")
    if path not in files:
        files.append(path)
    module = path[:-3].replace("/", ".")
    for name in functions.split(",") if functions else ["*"]:
        cls, _, method = name.rpartition(".")
        if name == "*":
            globs.append(f"{module}.*")
        elif cls:
            globs.append(f"{module}.xǁ{cls}ǁ{method}__mutmut_*")
        elif name[:1].isupper():
            globs.append(f"{module}.xǁ{name}ǁ*")
        else:
            globs.append(f"{module}.x_{name}__mutmut_*")

def lines(values):
    return "".join(f"\n    {v}" for v in values)

Path(stage, "setup.cfg").write_text(
    "[mutmut]\nsource_paths = genflow\n"
    f"also_copy ={lines(['benchmarks/', 'configs/'])}\n"  # what tests read beside tests/ (stand-in servers, data)
    # each mutant's tests run in a process forked from a clean one, not from the one that ran the
    # whole suite for stats: code that runs once a process (a log record factory installed, types
    # imported on first use) runs again under each mutant instead of being found done already
    "process_isolation = forkserver\n"
    # a mutant that hangs (a retry loop, a limit never released) is killed after 5x the time its
    # tests took for the stats, plus 5 s, not mutmut's 15x: a request test's 5 s made that 90 s
    "timeout_multiplier = 5\ntimeout_constant = 1\n"
    f"only_mutate ={lines(files)}\n"
    f"pytest_add_cli_args_test_selection ={lines(dict.fromkeys(t for t in tests.split() if Path(stage, t).exists()))}\n"
    # the marker `cli` leaves out the fast tests that start a genflow subprocess (a name filter
    # such as -k 'not cli' would also drop every test named for a client or CLIP)
    f"pytest_add_cli_args ={lines(['-m', 'not slow and not cli', *(['-k', tests_k] if tests_k else []), '-p', 'no:cacheprovider', '-q'])}\n")
Path(stage, "mutant-globs.txt").write_text("\n".join(dict.fromkeys(globs)) + "\n")
EOF

cd "$STAGE"
mapfile -t GLOBS < mutant-globs.txt
started=$(date +%s)
echo "mutmut run: generating the mutants, then running the fast tests against each (log: $STAGE/run.log)"
"$BIN/mutmut" run "${GLOBS[@]}" > run.log 2>&1 || { tail -20 run.log; echo "mutmut run failed"; exit 1; }
elapsed=$(( $(date +%s) - started ))
"$BIN/mutmut" results --all true > results.txt

"$BIN/python" - "$elapsed" "$BIN/mutmut" "${DIFFS:-1}" <<'EOF'
import fnmatch
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

globs = Path("mutant-globs.txt").read_text().split()
status = {}
for line in Path("results.txt").read_text().splitlines():
    name, _, state = line.strip().rpartition(": ")
    if name and any(fnmatch.fnmatch(name, g) for g in globs):
        status[name] = state
by_module = defaultdict(Counter)
for name, state in status.items():
    module = name.split(".x", 1)[0]
    by_module[module][state] += 1
survivors = sorted(n for n, s in status.items() if s == "survived")
for name in survivors:  # DIFFS=0: names only (each diff is a mutmut process: a second or two)
    if sys.argv[3] == "0":
        print(f"# {name}: survived")
        continue
    print(subprocess.run([sys.argv[2], "show", name], capture_output=True, text=True).stdout.rstrip())
    print()
unreached = Counter(n.split("__mutmut_")[0] for n, s in status.items() if s == "no tests")
if unreached:
    print("not reached by any fast test (function: mutants):")
    for function, count in sorted(unreached.items()):
        print(f"  {function}: {count}")
print("mutants by module (only the functions in MUTATE):")
for module in sorted(by_module):
    counts = by_module[module]
    print(f"  {module:36s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
total = Counter()
for c in by_module.values():
    total.update(c)
in_scope = sum(total.values())
killed = total["killed"] + total["timeout"] + total["caught by type check"]
print(f"surviving mutants: {total['survived']}" + (" (diffs above)" if survivors else ""))
print(f"not reached by any fast test: {total['no tests']} (they count as surviving)")
score = 100.0 * killed / in_scope if in_scope else 0.0
print(f"mutation score: {killed}/{in_scope} killed = {score:.1f}%  (mutmut run: {sys.argv[1]} s)")
EOF
