"""The state machine (RunStateMachine) as CloudFormation deploys it: its definition read
from the translated template with the substitutions put in, checked against the
template's own resources, and run, state by state, through a small interpreter of the
parts of the Amazon States Language it uses (JSONPath, Parameters, ResultSelector,
ResultPath, Choice, Catch, the intrinsic functions), with the integrations faked. There
is no Step Functions, ECS or Lambda here: what only AWS can prove is named in the README.

Also the Fargate task beside it: its environment against the functions', its roles, and
its bootstrap command, compiled.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from supabackup import errors, tabledata
from supabackup.handlers.events import parse_backup_event, parse_restore_event

from .helpers import EVENTS
from .test_template import as_list, default, translate

STATE_MACHINE = "RunStateMachine"
LAMBDA = "arn:aws:states:::lambda:invoke"
RUN_TASK = "arn:aws:states:::ecs:runTask.sync"
PUBLISH = "arn:aws:states:::sns:publish"
INTEGRATIONS = {LAMBDA, RUN_TASK, PUBLISH}
HANDLERS = {"PlanFunction": "supabackup.handlers.plan.handler",
            "BackupFunction": "supabackup.handlers.backup.handler",
            "RestoreFunction": "supabackup.handlers.restore.handler"}
TOKEN = "\u00ab{}\u00bb"  # what a substitution becomes here: «Name»


# ------------------------------------------------------------------ reading the definition


@pytest.fixture(scope="module")
def cfn() -> dict[str, Any]:
    return translate()


def substitutions(cfn: dict[str, Any]) -> dict[str, Any]:
    return dict(cfn["Resources"][STATE_MACHINE]["Properties"]["DefinitionSubstitutions"])


def definition_text(cfn: dict[str, Any]) -> str:
    joined = cfn["Resources"][STATE_MACHINE]["Properties"]["DefinitionString"]["Fn::Join"]
    separator, lines = joined
    assert all(isinstance(line, str) for line in lines), "an intrinsic inside the definition"
    return str(separator).join(lines)


def definition(cfn: dict[str, Any]) -> dict[str, Any]:
    """The definition as Step Functions gets it, each ${Name} replaced by «Name»."""
    text = definition_text(cfn)
    for name in substitutions(cfn):
        text = text.replace("${" + name + "}", TOKEN.format(name))
    assert "${" not in text, re.findall(r"\$\{[^}]*\}", text)
    parsed: dict[str, Any] = json.loads(text)
    return parsed


@pytest.fixture(scope="module")
def asl(cfn: dict[str, Any]) -> dict[str, Any]:
    return definition(cfn)


# What the parameters' substitutions come to in a stack deployed with TaskSpot true and
# two subnets (the resources' ARNs stay «Name»).
DEPLOYED = {"Partition": "aws", "TaskSubnets": "subnet-1,subnet-2",
            "TaskSecurityGroups": "sg-1", "TaskAssignPublicIp": "ENABLED",
            "TaskCapacityProvider": "FARGATE_SPOT"}


@pytest.fixture(scope="module")
def deployed(cfn: dict[str, Any]) -> dict[str, Any]:
    """The definition with the parameters' values in: what the interpreter runs."""
    values = dict(DEPLOYED)
    table, key, field = substitutions(cfn)["TaskTimeoutSeconds"]["Fn::FindInMap"]
    values["TaskTimeoutSeconds"] = str(cfn["Mappings"][table][default(cfn, key)][field])
    text = json.dumps(definition(cfn), ensure_ascii=False)
    for name, value in values.items():
        text = text.replace(TOKEN.format(name), value)
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def substituted(cfn: dict[str, Any], value: Any) -> Any:
    """What a «Name» in the definition stands for: the substitution's intrinsic."""
    match = re.fullmatch(TOKEN.format("(\\w+)"), value) if isinstance(value, str) else None
    return substitutions(cfn)[match.group(1)] if match else value


def resolved(cfn: dict[str, Any], text: str) -> str:
    """A resource ARN of the definition with the partition of the default region."""
    assert substitutions(cfn)["Partition"] == {"Ref": "AWS::Partition"}
    return text.replace(TOKEN.format("Partition"), DEPLOYED["Partition"])


def states_of(asl: dict[str, Any], resource: str, cfn: dict[str, Any]
              ) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in asl["States"].items()
            if s["Type"] == "Task" and resolved(cfn, s["Resource"]) == resource}


def targets(state: dict[str, Any]) -> Iterator[str]:
    """Every state a state can go to: Next, a Choice's rules and Default, its Catches."""
    if "Next" in state:
        yield state["Next"]
    for rule in state.get("Choices", []):
        yield rule["Next"]
    if "Default" in state:
        yield state["Default"]
    for catch in state.get("Catch", []):
        yield catch["Next"]


def reachable(asl: dict[str, Any], start: str, stop: Callable[[str], bool] = lambda _: False
              ) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if not stop(name):
            todo.extend(targets(asl["States"][name]))
    return seen


def resource_of(cfn: dict[str, Any], intrinsic: Any, type_: str) -> str:
    """The logical id a GetAtt/Ref names, checked to be a resource of that type."""
    if set(intrinsic) == {"Fn::GetAtt"}:
        name, attribute = intrinsic["Fn::GetAtt"]
        assert attribute == "Arn", intrinsic
    else:
        name = intrinsic["Ref"]
    assert cfn["Resources"][name]["Type"] == type_, (name, type_)
    return str(name)


# ------------------------------------------------------------------ an interpreter


class StatesError(Exception):
    def __init__(self, error: str, cause: str = "") -> None:
        super().__init__(f"{error}: {cause}")
        self.error, self.cause = error, cause


def path_get(data: Any, path: str, context: dict[str, Any]) -> Any:
    """A JSONPath reference ($.a.b[0].c, $$.Execution.Name); a missing one is an error
    (Step Functions fails the execution with States.Runtime)."""
    if path.startswith("$$"):
        data, path = context, path[1:]
    assert path.startswith("$"), path
    for part in re.findall(r"\.(\w+)|\[(\d+)\]", path[1:]):
        key, index = part
        try:
            data = data[key] if key else data[int(index)]
        except (KeyError, IndexError, TypeError):
            raise StatesError("States.Runtime", f"{path} is not in the input") from None
    return data


def intrinsic(text: str, data: Any, context: dict[str, Any]) -> Any:
    match = re.fullmatch(r"(States\.\w+)\((.*)\)", text, re.S)
    assert match, text
    function, args = match.group(1), intrinsic_args(match.group(2), data, context)
    if function == "States.Format":
        template, *values = args
        pieces = template.split("{}")
        assert len(pieces) == len(values) + 1, text
        out = pieces[0]
        for value, piece in zip(values, pieces[1:], strict=True):
            out += (value if isinstance(value, str) else json.dumps(value)) + piece
        return out
    if function == "States.StringToJson":
        try:
            return json.loads(args[0])
        except (TypeError, ValueError):
            raise StatesError("States.Runtime", "not JSON text") from None
    if function == "States.JsonToString":
        return json.dumps(args[0], separators=(",", ":"))
    if function == "States.StringSplit":
        return [part for part in args[0].split(args[1]) if part]
    if function == "States.ArrayLength":
        if not isinstance(args[0], list):
            raise StatesError("States.Runtime", "not an array")
        return len(args[0])
    raise AssertionError(f"no such intrinsic here: {function}")


def intrinsic_args(text: str, data: Any, context: dict[str, Any]) -> list[Any]:
    """'literal' (with \\' \\{ \\} \\\\ escapes) or a JSONPath, comma-separated."""
    args, i = [], 0
    while i < len(text):
        if text[i] in " ,":
            i += 1
        elif text[i] == "'":
            j, out = i + 1, ""
            while text[j] != "'":
                if text[j] == "\\":
                    j += 1
                out += text[j]
                j += 1
            args.append(out)
            i = j + 1
        else:
            j = i
            while j < len(text) and text[j] != ",":
                j += 1
            args.append(path_get(data, text[i:j].strip(), context))
            i = j
    return args


def evaluate(template: Any, data: Any, context: dict[str, Any]) -> Any:
    """Parameters or ResultSelector: keys ending in .$ take a path or an intrinsic."""
    if isinstance(template, dict):
        out = {}
        for key, value in template.items():
            if key.endswith(".$"):
                out[key[:-2]] = (intrinsic(value, data, context) if value.startswith("States.")
                                 else path_get(data, value, context))
            else:
                out[key] = evaluate(value, data, context)
        return out
    if isinstance(template, list):
        return [evaluate(item, data, context) for item in template]
    return template


def put(data: Any, path: str | None, result: Any) -> Any:
    if path is None:
        return data
    if path == "$":
        return result
    keys = path[2:].split(".")
    out = json.loads(json.dumps(data))
    node = out
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = result
    return out


def rule_matches(rule: dict[str, Any], data: Any, context: dict[str, Any]) -> bool:
    if "And" in rule:
        return all(rule_matches(r, data, context) for r in rule["And"])
    if "Or" in rule:
        return any(rule_matches(r, data, context) for r in rule["Or"])
    if "Not" in rule:
        return not rule_matches(rule["Not"], data, context)
    if "IsPresent" in rule:
        try:
            path_get(data, rule["Variable"], context)
        except StatesError:
            return not rule["IsPresent"]
        return bool(rule["IsPresent"])
    value = path_get(data, rule["Variable"], context)  # missing: States.Runtime, as in AWS
    [(test, expected)] = [(k, v) for k, v in rule.items() if k not in ("Variable", "Next")]
    if test == "StringEquals":
        return isinstance(value, str) and value == expected
    if test == "StringMatches":
        return isinstance(value, str) and fnmatch.fnmatchcase(value, expected)
    if test == "NumericEquals":
        return isinstance(value, int | float) and value == expected
    raise AssertionError(f"no such comparison here: {test}")


# Terminal: States.ALL does not catch them (AWS Step Functions, "Error handling":
# States.ALL "can't catch the States.DataLimitExceeded terminal error type and runtime
# error types"); the execution fails, and only the RunFailedAlarm tells.
UNCATCHABLE = {"States.Runtime", "States.DataLimitExceeded"}


def catches(error: str, names: list[str]) -> bool:
    """States.ALL matches any error but the terminal ones; States.TaskFailed any but
    those and States.Timeout."""
    if error in UNCATCHABLE:
        return False
    return any(n == error or n == "States.ALL"
               or (n == "States.TaskFailed" and error != "States.Timeout") for n in names)


Integration = Callable[[str, str, dict[str, Any]], Any]


def run(asl: dict[str, Any], cfn: dict[str, Any], execution_input: dict[str, Any],
        integration: Integration) -> tuple[list[str], str, Any]:
    """Run the definition: (the states entered, the final state's type, the output).
    `integration(state, resource, parameters)` returns a task's result or raises
    StatesError. An error no Catch takes (or one in a Pass or Choice state) fails the
    execution: raised as StatesError."""
    context = {"Execution": {"Name": "exec-1", "Id": "arn:exec-1"}}
    name, data, visited = asl["StartAt"], execution_input, []
    while True:
        visited.append(name)
        assert len(visited) < 50, visited
        state = asl["States"][name]
        kind = state["Type"]
        if kind in ("Succeed", "Fail"):
            return visited, kind, data
        if kind == "Choice":
            name = next((r["Next"] for r in state["Choices"]
                         if rule_matches(r, data, context)), state.get("Default"))
            assert name, f"no rule matched and no Default in {visited[-1]}"
            continue
        if kind == "Pass":
            result = evaluate(state.get("Parameters", data), data, context)
            data = put(data, state.get("ResultPath", "$"), result)
        elif kind == "Task":
            parameters = evaluate(state["Parameters"], data, context)
            try:
                result = integration(name, resolved(cfn, state["Resource"]), parameters)
                if "ResultSelector" in state:
                    result = evaluate(state["ResultSelector"], result, context)
            except StatesError as exc:
                caught = [c for c in state.get("Catch", []) if catches(exc.error,
                                                                       c["ErrorEquals"])]
                if not caught:
                    raise
                catch = caught[0]
                data = put(data, catch.get("ResultPath", "$"),
                           {"Error": exc.error, "Cause": exc.cause})
                name = catch["Next"]
                continue
            data = put(data, state.get("ResultPath", "$"), result)
        else:
            raise AssertionError(f"no such state type here: {kind}")
        name = state["Next"]


# ------------------------------------------------------------------ fakes


BACKUP = {"operation": "backup", "event": json.loads(
    (EVENTS / "backup-full-scheduled.json").read_text())}
RESTORE = json.loads((EVENTS / "restore-large.json").read_text())


def stopped_task(stop_code: str | None = "EssentialContainerExited",
                 exit_code: int | None = 10, reason: str | None = "Essential container in task "
                 "exited", provider: str = "FARGATE_SPOT") -> str:
    """The Cause of States.TaskFailed: the stopped task, as DescribeTasks gives it, with
    PascalCase keys, as JSON text (research: toricls' gist, catalogue-pipeline#3377)."""
    container: dict[str, Any] = {"Name": "engine", "LastStatus": "STOPPED"}
    if exit_code is not None:
        container["ExitCode"] = exit_code
    task: dict[str, Any] = {"TaskArn": "arn:aws:ecs:us-east-1:123456789012:task/c/abc",
                            "LastStatus": "STOPPED", "Containers": [container],
                            "CapacityProviderName": provider,
                            "Overrides": {"ContainerOverrides": [{"Name": "engine",
                                                                  "Environment": []}]}}
    if stop_code is not None:
        task["StopCode"] = stop_code
    if reason is not None:
        task["StoppedReason"] = reason
    return json.dumps(task)


class Fakes:
    """Lambda, ECS and SNS as the states see them: scripted outcomes, recorded calls."""

    def __init__(self, path: str = "lambda", lambda_error: str | None = None,
                 plan_error: str | None = None, tasks: list[Any] | None = None,
                 result: dict[str, Any] | None = None) -> None:
        self.path, self.lambda_error, self.plan_error = path, lambda_error, plan_error
        self.tasks = list(tasks or [])  # per RunTask: None (succeeds) or a StatesError
        self.result = result  # the backup or restore function's; else as theirs would be
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, state: str, resource: str, parameters: dict[str, Any]) -> Any:
        self.calls.append((state, resource, parameters))
        if resource == LAMBDA:
            if state == "Plan":
                if self.plan_error:
                    raise StatesError(self.plan_error, "{}")
                assert set(parameters["Payload"]) == {"operation", "event"}
                return {"Payload": {**parameters["Payload"], "path": self.path,
                                    "estimate_seconds": 100, "limit_seconds": 840,
                                    "reason": "fits"}, "StatusCode": 200}
            if self.lambda_error:
                raise StatesError(self.lambda_error, '{"errorMessage": "..."}')
            default = BACKUP_RESULT if state == "InvokeBackup" else RESTORE_RESULT
            return {"Payload": self.result or default, "StatusCode": 200,
                    "ExecutedVersion": "$LATEST", "SdkHttpMetadata": {"HttpStatusCode": 200}}
        if resource == RUN_TASK:
            outcome = self.tasks.pop(0) if self.tasks else None
            if outcome is not None:
                raise outcome
            return {"TaskArn": "arn:aws:ecs:us-east-1:123456789012:task/c/ok",
                    "Containers": [{"Name": "engine", "ExitCode": 0}]}
        if resource == PUBLISH:
            return {"MessageId": "m-1"}
        raise AssertionError(resource)

    def states(self, resource: str) -> list[str]:
        return [state for state, r, _ in self.calls if r == resource]

    def published(self) -> list[dict[str, Any]]:
        return [p for _, r, p in self.calls if r == PUBLISH]


# The functions' results (handlers/backup.py, restore.py), with what makes them long.
BACKUP_RESULT = {"backup_id": "20260101T000000Z-full", "database_id": "db", "kind": "full",
                 "bytes": 123456, "duration_seconds": 61.5, "warnings": ["w"] * 50,
                 "tables_dumped": 4000, "tables_total": 4000, "files": {"files": 9}}
DUPLICATE_RESULT = {"duplicate": True, "tick": "2026-01-04T03:00:00Z",
                    "message": "tick 2026-01-04T03:00:00Z already has backup ..."}
DRY_RUN_RESULT = {"at": None, "dry_run": True, "backup_id": "20260101T000000Z-full",
                  "method": "backup", "plan": [f"restore table part {n}" for n in range(5000)]}
RESTORE_RESULT = {"backup_id": "20260101T000000Z-full", "at": None, "method": "backup",
                  "target": "postgresql://target", "lines": ["restored ...", "created roles"],
                  "files": 9}


def task_failed(**kwargs: Any) -> StatesError:
    return StatesError("States.TaskFailed", stopped_task(**kwargs))


# ------------------------------------------------------------------ the definition's shape


def test_every_placeholder_has_a_substitution_and_every_substitution_is_used(
        cfn: dict[str, Any]) -> None:
    text = definition_text(cfn)
    used = set(re.findall(r"\$\{(\w+)\}", text))
    assert used == set(substitutions(cfn))
    # CloudFormation substitutes text: a list would not survive it
    assert all(not isinstance(v, list) for v in substitutions(cfn).values())


def test_every_task_is_an_allowed_integration_on_the_templates_resources(
        cfn: dict[str, Any], asl: dict[str, Any]) -> None:
    tasks = {n: s for n, s in asl["States"].items() if s["Type"] == "Task"}
    assert {resolved(cfn, s["Resource"]) for s in tasks.values()} == INTEGRATIONS
    # lambda:invoke: the plan, backup and restore functions, by their static ARN
    invoked = {}
    for name, state in states_of(asl, LAMBDA, cfn).items():
        function = resource_of(cfn, substituted(cfn, state["Parameters"]["FunctionName"]),
                               "AWS::Lambda::Function")
        assert cfn["Resources"][function]["Properties"]["Handler"] == HANDLERS[function]
        module, attribute = HANDLERS[function].rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), attribute))
        invoked[name] = (function, state["Parameters"]["Payload.$"])
    assert invoked == {"Plan": ("PlanFunction", "$"),
                       "InvokeBackup": ("BackupFunction", "$.event"),
                       "InvokeRestore": ("RestoreFunction", "$.event")}
    # sns:publish: the stack's topic
    [(_, report)] = states_of(asl, PUBLISH, cfn).items()
    resource_of(cfn, substituted(cfn, report["Parameters"]["TopicArn"]), "AWS::SNS::Topic")


def test_the_task_states_run_the_templates_task_on_its_cluster_in_its_network(
        cfn: dict[str, Any], asl: dict[str, Any]) -> None:
    runs = states_of(asl, RUN_TASK, cfn)
    assert set(runs) == {"RunTask", "RunTaskOnDemand"}
    cluster = cfn["Resources"]["TaskCluster"]["Properties"]
    task = cfn["Resources"]["TaskDefinition"]["Properties"]
    [container] = task["ContainerDefinitions"]  # one: any container's exit fails the state
    for state in runs.values():
        params = state["Parameters"]
        resource_of(cfn, substituted(cfn, params["Cluster"]), "AWS::ECS::Cluster")
        resource_of(cfn, substituted(cfn, params["TaskDefinition"]), "AWS::ECS::TaskDefinition")
        assert "LaunchType" not in params  # RunTask refuses it beside a capacity provider
        [strategy] = params["CapacityProviderStrategy"]
        provider = substituted(cfn, strategy["CapacityProvider"])
        providers = provider["Fn::If"][1:] if isinstance(provider, dict) else [provider]
        assert set(providers) <= set(cluster["CapacityProviders"])
        network = params["NetworkConfiguration"]["AwsvpcConfiguration"]
        for key, parameter in (("Subnets.$", "TaskSubnetIds"),
                               ("SecurityGroups.$", "TaskSecurityGroupIds")):
            [name] = re.findall(r"States\.StringSplit\('\u00ab(\w+)\u00bb', ','\)", network[key])
            assert substitutions(cfn)[name] == {"Fn::Join": [",", {"Ref": parameter}]}
            assert cfn["Parameters"][parameter]["Type"] == "CommaDelimitedList"
        public_ip = substituted(cfn, network["AssignPublicIp"])
        assert set(cfn["Parameters"][public_ip["Ref"]]["AllowedValues"]) == {"ENABLED",
                                                                              "DISABLED"}
        [override] = params["Overrides"]["ContainerOverrides"]
        assert override["Name"] == container["Name"]
        assert {e["Name"] for e in override["Environment"]} == {"SUPABACKUP_OPERATION",
                                                                "SUPABACKUP_EVENT"}
        assert params["PlatformVersion"] == "1.4.0"  # ephemeral storage, 8 and 16 vCPU
    # the on-demand run is the first one but for its capacity
    first, second = (dict(runs[n]["Parameters"]) for n in ("RunTask", "RunTaskOnDemand"))
    assert substituted(cfn, first.pop("CapacityProviderStrategy")[0]["CapacityProvider"]) == {
        "Fn::If": ["UseTaskSpot", "FARGATE_SPOT", "FARGATE"]}
    assert second.pop("CapacityProviderStrategy") == [{"CapacityProvider": "FARGATE",
                                                       "Weight": 1}]
    assert first == second
    assert cfn["Parameters"]["TaskSpot"]["Default"] == "false"


def test_the_fargate_path_is_off_without_subnets_and_on_spot_only_when_asked(
        cfn: dict[str, Any]) -> None:
    params, conditions = cfn["Parameters"], cfn["Conditions"]
    assert params["TaskSubnetIds"]["Default"] == ""  # off by default: every run on Lambda
    assert conditions["UseTaskSpot"] == {"Fn::Equals": [{"Ref": "TaskSpot"}, "true"]}
    assert set(params["TaskSpot"]["AllowedValues"]) == {"true", "false"}
    # subnets without security groups would fail only at the first large run: refused at deploy
    [rule] = [r for r in cfn["Rules"].values()
              if r["RuleCondition"] == conditions["HasTaskNetwork"]]
    [assertion] = rule["Assertions"]
    assert assertion["Assert"] == {"Fn::Not": [{"Fn::Equals": [
        {"Fn::Join": ["", {"Ref": "TaskSecurityGroupIds"}]}, ""]}]}


def test_every_target_exists_and_every_state_is_reachable(asl: dict[str, Any]) -> None:
    names = set(asl["States"])
    for name, state in asl["States"].items():
        for target in targets(state):
            assert target in names, (name, target)
        assert state["Type"] in ("Succeed", "Fail", "Choice") or "Next" in state, name
        if state["Type"] == "Choice":
            assert "Default" in state, name  # no rule matching would fail the execution
    assert reachable(asl, asl["StartAt"]) == names


def error_paths(asl: dict[str, Any], start: str, path: tuple[str, ...] = ()
                ) -> Iterator[tuple[str, ...]]:
    """Every path from a Catch's target to its end; a task run again (the on-demand run)
    ends its path: its own Catches are paths of their own."""
    path = (*path, start)
    assert len(path) < 30, path
    state = asl["States"][start]
    if state["Type"] in ("Succeed", "Fail") or (
            state["Type"] == "Task" and "runTask" in state["Resource"]):
        yield path
        return
    for target in dict.fromkeys(targets(state)):
        yield from error_paths(asl, target, path)


def test_every_error_path_ends_in_the_report_or_in_a_failure_the_engine_reported(
        cfn: dict[str, Any], asl: dict[str, Any]) -> None:
    report = "ReportFailure"
    assert resolved(cfn, asl["States"][report]["Resource"]) == PUBLISH
    starts = {c["Next"] for s in asl["States"].values() for c in s.get("Catch", [])}
    starts.discard("Failed")  # the report's own failure: it could not tell anyone more
    assert starts
    ends = set()
    for start in starts:
        for path in error_paths(asl, start):
            last = asl["States"][path[-1]]
            if last["Type"] == "Task":  # run once more, on demand
                assert resolved(cfn, last["Resource"]) == RUN_TASK, path
                continue
            assert last["Type"] == "Fail", path  # an error never ends in success
            before = asl["States"][path[-2]]
            # ReportFailure -> Fail, or a Choice's branch for what the engine reported
            assert path[-2] == report or before["Type"] == "Choice", path
            if before["Type"] == "Choice":
                assert report not in path and len([p for p in path if asl["States"][p][
                    "Type"] == "Pass"]) <= 1, path
            ends.add(path[-2])
    assert report in ends
    assert asl["States"][report]["Next"] == "Failed"
    [catch] = asl["States"][report]["Catch"]
    assert catch["Next"] == "Failed"


def test_the_state_machine_logs_traces_and_times_out(cfn: dict[str, Any],
                                                     asl: dict[str, Any]) -> None:
    props = cfn["Resources"][STATE_MACHINE]["Properties"]
    assert props["TracingConfiguration"] == {"Enabled": True}
    logging = props["LoggingConfiguration"]
    assert logging["Level"] in ("ERROR", "ALL") and logging["IncludeExecutionData"] is False
    [destination] = logging["Destinations"]
    group = destination["CloudWatchLogsLogGroup"]["LogGroupArn"]
    assert group == {"Fn::GetAtt": ["RunStateMachineLogGroup", "Arn"]}
    log_group = cfn["Resources"]["RunStateMachineLogGroup"]["Properties"]
    assert log_group["RetentionInDays"] == {"Ref": "LogRetentionDays"}
    assert log_group["LogGroupName"]["Fn::Sub"].startswith("/aws/vendedlogs/states/")
    # each task state ends on its own; the execution outlasts its longest path
    for name, state in asl["States"].items():
        if state["Type"] == "Task" and resolved(cfn, state["Resource"]) != PUBLISH:
            assert "TimeoutSeconds" in state or "TimeoutSecondsPath" in state, name
    timeout_max = cfn["Parameters"]["FunctionTimeout"]["MaxValue"]
    for name in ("InvokeBackup", "InvokeRestore"):
        assert asl["States"][name]["TimeoutSeconds"] > timeout_max
    mapping = cfn["Mappings"]["TaskTimeout"]
    longest_task = max(v["Seconds"] for v in mapping.values())
    assert asl["TimeoutSeconds"] >= (asl["States"]["Plan"]["TimeoutSeconds"]
                                     + 2 * longest_task + retry_seconds(asl, "Plan"))


def retry_seconds(asl: dict[str, Any], state: str, error: str | None = None) -> float:
    """The longest a state's retries wait in all (for one error, or the longest rule)."""
    totals = []
    for rule in asl["States"][state].get("Retry", []):
        if error is None or error in rule["ErrorEquals"]:
            interval, rate = rule["IntervalSeconds"], rule.get("BackoffRate", 2)
            totals.append(sum(interval * rate ** n for n in range(rule["MaxAttempts"])))
    return max(totals, default=0)


def test_the_task_timeout_reaches_the_state_as_a_number_above_the_engines_own_limit(
        cfn: dict[str, Any], asl: dict[str, Any]) -> None:
    [(name, value)] = [(k, v) for k, v in substitutions(cfn).items() if "FindInMap" in str(v)]
    table, key, field = value["Fn::FindInMap"]
    assert (key, field) == ({"Ref": "TaskTimeoutHours"}, "Seconds")
    prepare = asl["States"]["PrepareTask"]
    assert prepare["Parameters"]["timeout_seconds.$"] == (
        f"States.StringToJson('{TOKEN.format(name)}')")
    params = cfn["Parameters"]["TaskTimeoutHours"]
    assert set(cfn["Mappings"][table]) == set(params["AllowedValues"])
    env = task_environment(cfn)
    assert env["SUPABACKUP_TIME_LIMIT"] == {"Fn::FindInMap": [table, {"Ref": "TaskTimeoutHours"},
                                                              "EngineSeconds"]}
    for hours, row in cfn["Mappings"][table].items():
        text = definition_text(cfn).replace("${" + name + "}", str(row[field]))
        # a substitution is text: States.StringToJson makes it the number TimeoutSecondsPath needs
        match = re.search(r"StringToJson\('(\d+)'\)", text)
        assert match and json.loads(match.group(1)) == int(hours) * 3600
        # the engine stops itself first, with time to stop cleanly and report
        assert row["Seconds"] - row["EngineSeconds"] >= 600 and row["EngineSeconds"] > 0
    for state in states_of(asl, RUN_TASK, cfn).values():
        assert state["TimeoutSecondsPath"] == "$.task.timeout_seconds"
    # no way into a task run but through PrepareTask
    sets_task = {n for n, s in asl["States"].items() if s.get("ResultPath") == "$.task"}
    assert sets_task == {"PrepareTask"}
    before = reachable(asl, asl["StartAt"], stop=lambda n: n in sets_task) - sets_task
    assert not before & set(states_of(asl, RUN_TASK, cfn))


# ------------------------------------------------------------------ runs, with fakes


@pytest.mark.parametrize("execution, function", [(BACKUP, "BackupFunction"),
                                                 (RESTORE, "RestoreFunction")])
def test_a_run_that_fits_goes_to_its_function_with_the_event_alone(
        cfn: dict[str, Any], deployed: dict[str, Any], execution: dict[str, Any],
        function: str) -> None:
    fakes = Fakes("lambda")
    visited, end, output = run(deployed, cfn, execution, fakes)
    assert end == "Succeed" and visited[-1] == "Done"
    [(_, _, plan), (state, _, invoke)] = fakes.calls
    assert plan["Payload"] == execution
    assert invoke["Payload"] == execution["event"]
    assert substituted(cfn, deployed["States"][state]["Parameters"]["FunctionName"]) == {
        "Fn::GetAtt": [function, "Arn"]}
    assert output["result"]["path"] == "lambda" and not fakes.published()


@pytest.mark.parametrize("execution", [BACKUP, RESTORE])
def test_a_run_that_cannot_fit_runs_the_task_with_its_operation_and_event(
        cfn: dict[str, Any], deployed: dict[str, Any], execution: dict[str, Any]) -> None:
    fakes = Fakes("fargate")
    _, end, output = run(deployed, cfn, execution, fakes)
    # a backup on TaskCapacityProvider (Spot here), a restore on demand only
    state, provider = {"backup": ("RunTask", "FARGATE_SPOT"),
                       "restore": ("RunTaskOnDemand", "FARGATE")}[execution["operation"]]
    assert end == "Succeed" and fakes.states(RUN_TASK) == [state]
    assert not fakes.states(LAMBDA)[1:]  # the plan only
    [(_, _, params)] = [c for c in fakes.calls if c[1] == RUN_TASK]
    assert params["CapacityProviderStrategy"] == [{"CapacityProvider": provider, "Weight": 1}]
    env = {e["Name"]: e["Value"] for e in params["Overrides"]["ContainerOverrides"][0][
        "Environment"]}
    assert env["SUPABACKUP_OPERATION"] == execution["operation"]
    assert json.loads(env["SUPABACKUP_EVENT"]) == execution["event"]
    assert all(isinstance(v, str) for v in env.values())  # ECS takes text only
    # the container overrides stay far below RunTask's 8192 characters
    assert len(json.dumps(params["Overrides"])) < 2048
    assert output["result"] == {"path": "fargate",
                                "task_arn": "arn:aws:ecs:us-east-1:123456789012:task/c/ok"}


ENGINE_ERRORS = sorted({cls.__name__ for cls in vars(errors).values()
                        if isinstance(cls, type) and issubclass(cls, errors.SupabackupError)})
# What Lambda and Step Functions raise when a function could not answer for itself.
PLATFORM_ERRORS = ["Lambda.Unknown", "Sandbox.Timedout", "States.Timeout", "States.TaskFailed",
                   "Runtime.ExitError", "Lambda.TooManyRequestsException",
                   "Lambda.ServiceException"]


@pytest.mark.parametrize("error", ENGINE_ERRORS)
@pytest.mark.parametrize("where", ["plan", "function"])
def test_a_failure_the_engine_reported_fails_without_a_second_message(
        cfn: dict[str, Any], deployed: dict[str, Any], error: str, where: str) -> None:
    fakes = Fakes(plan_error=error) if where == "plan" else Fakes(lambda_error=error)
    visited, end, _ = run(deployed, cfn, BACKUP, fakes)
    assert (end, visited[-1]) == ("Fail", "Failed")
    assert not fakes.published()


@pytest.mark.parametrize("error", PLATFORM_ERRORS)
@pytest.mark.parametrize("where, execution", [("plan", BACKUP), ("function", BACKUP),
                                              ("function", RESTORE)])
def test_a_failure_the_engine_could_not_report_is_published(
        cfn: dict[str, Any], deployed: dict[str, Any], error: str, where: str,
        execution: dict[str, Any]) -> None:
    fakes = Fakes(plan_error=error) if where == "plan" else Fakes(lambda_error=error)
    visited, end, _ = run(deployed, cfn, execution, fakes)
    assert (end, visited[-2:]) == ("Fail", ["ReportFailure", "Failed"])
    [message] = fakes.published()
    operation = execution["operation"]
    assert message["Subject"] == f"supabackup: {operation} failed on lambda"
    body = check_message(message, operation)
    assert body["error_type"] == error and error in body["error"]


def check_message(message: dict[str, Any], operation: str) -> dict[str, Any]:
    """The engine's message shape (notify.Outcome), so the same subscriptions and filters
    see it; never the event."""
    assert len(message["Subject"]) <= 100 and "\n" not in message["Subject"]
    assert message["MessageAttributes"]["status"] == {"DataType": "String",
                                                      "StringValue": "failed"}
    assert message["MessageAttributes"]["kind"]["StringValue"] == operation
    body: dict[str, Any] = json.loads(message["Message"])
    assert {"status", "kind", "database", "error", "error_type", "what_to_do"} <= set(body)
    assert body["status"] == "failed" and body["execution"] == "exec-1"
    assert body["kind"] == operation and "run it again" in body["what_to_do"]
    if operation == "restore":  # what a stopped restore leaves, and what to do about it
        assert "partial restore" in body["what_to_do"]
        assert "drop and recreate it (a new, empty database)" in body["what_to_do"]
    elif operation == "backup":
        assert body["what_to_do"].startswith("nothing of the run is kept: run it again")
    for event in (BACKUP["event"], RESTORE["event"]):
        assert json.dumps(event) not in message["Message"]
    assert "tick" not in message["Message"] and "Overrides" not in message["Message"]
    return body


@pytest.mark.parametrize("stop_code", ["SpotInterruption", "TaskFailedToStart"])
def test_a_spot_interruption_or_a_task_that_never_started_runs_once_more_on_demand(
        cfn: dict[str, Any], deployed: dict[str, Any], stop_code: str) -> None:
    exit_code = 143 if stop_code == "SpotInterruption" else None
    fakes = Fakes("fargate", tasks=[task_failed(stop_code=stop_code, exit_code=exit_code)])
    visited, end, _ = run(deployed, cfn, BACKUP, fakes)
    assert end == "Succeed" and fakes.states(RUN_TASK) == ["RunTask", "RunTaskOnDemand"]
    second = [p for _, r, p in fakes.calls if r == RUN_TASK][1]
    assert second["CapacityProviderStrategy"] == [{"CapacityProvider": "FARGATE", "Weight": 1}]
    assert not fakes.published()

    # once: the on-demand run stopped the same way is reported, never run a third time
    again = Fakes("fargate", tasks=[task_failed(stop_code=stop_code, exit_code=exit_code)] * 2)
    visited, end, _ = run(deployed, cfn, BACKUP, again)
    assert again.states(RUN_TASK) == ["RunTask", "RunTaskOnDemand"]
    assert (end, visited[-2:]) == ("Fail", ["ReportFailure", "Failed"])
    [message] = again.published()
    body = check_message(message, "backup")
    assert stop_code in body["error"] and message["Subject"].endswith("on fargate")


def test_no_spot_capacity_at_all_runs_on_demand(cfn: dict[str, Any],
                                                 deployed: dict[str, Any]) -> None:
    fakes = Fakes("fargate", tasks=[StatesError("AmazonECS.Unknown", "RESOURCE:FARGATE")])
    _, end, _ = run(deployed, cfn, BACKUP, fakes)
    assert end == "Succeed" and fakes.states(RUN_TASK) == ["RunTask", "RunTaskOnDemand"]


def test_the_spot_retry_happens_once_whatever_the_on_demand_run_does(
        asl: dict[str, Any], cfn: dict[str, Any]) -> None:
    """From the on-demand run, no path leads to a task run again."""
    runs = set(states_of(asl, RUN_TASK, cfn))
    after = set().union(*(reachable(asl, t) for t in targets(asl["States"]["RunTaskOnDemand"])))
    assert not after & runs
    # and the first run's error paths lead to the on-demand run, never to itself
    first_after = set().union(*(reachable(asl, c["Next"], stop=lambda n: n in runs)
                                for c in asl["States"]["RunTask"]["Catch"]))
    assert first_after & runs == {"RunTaskOnDemand"}


@pytest.mark.parametrize("exit_code", [10, 12])  # failed, refused: the engine said so on SNS
@pytest.mark.parametrize("execution, on_demand", [(BACKUP, False), (BACKUP, True),
                                                  (RESTORE, False)])
def test_an_engine_exit_code_fails_without_a_second_message(
        cfn: dict[str, Any], deployed: dict[str, Any], exit_code: int,
        execution: dict[str, Any], on_demand: bool) -> None:
    first = [task_failed(stop_code="SpotInterruption", exit_code=143)] if on_demand else []
    fakes = Fakes("fargate", tasks=[*first, task_failed(exit_code=exit_code)])
    visited, end, _ = run(deployed, cfn, execution, fakes)
    assert (end, visited[-1]) == ("Fail", "Failed") and not fakes.published()
    assert len(fakes.states(RUN_TASK)) == (2 if on_demand else 1)


@pytest.mark.parametrize("exit_code", [1, 2, 70, 3, 137, 143, 0])
@pytest.mark.parametrize("execution, on_demand", [(BACKUP, False), (BACKUP, True),
                                                  (RESTORE, False)])
def test_any_other_exit_code_is_published(
        cfn: dict[str, Any], deployed: dict[str, Any], exit_code: int,
        execution: dict[str, Any], on_demand: bool) -> None:
    """1 is Python itself dying (an import error, a crash): the engine said nothing."""
    first = [task_failed(stop_code="SpotInterruption", exit_code=143)] if on_demand else []
    fakes = Fakes("fargate", tasks=[*first, task_failed(exit_code=exit_code)])
    visited, end, _ = run(deployed, cfn, execution, fakes)
    assert (end, visited[-2:]) == ("Fail", ["ReportFailure", "Failed"])
    [message] = fakes.published()
    assert f"code {exit_code} " in check_message(message, execution["operation"])["error"]


@pytest.mark.parametrize("task, said", [
    (dict(exit_code=137), "code 137"),  # out of memory, or killed
    (dict(exit_code=3), "code 3"),  # the bootstrap could not load the engine
    (dict(exit_code=143, stop_code="UserInitiated", reason="Task stopped by user"),
     "UserInitiated"),
    (dict(exit_code=None, stop_code="EssentialContainerExited", reason="OutOfMemoryError"),
     "OutOfMemoryError"),
    (dict(exit_code=139, stop_code=None, reason=None), "States.TaskFailed"),  # nothing said
])
def test_a_task_that_stopped_otherwise_is_published_with_what_stopped_it(
        cfn: dict[str, Any], deployed: dict[str, Any], task: dict[str, Any], said: str) -> None:
    fakes = Fakes("fargate", tasks=[task_failed(**task)])
    visited, end, _ = run(deployed, cfn, BACKUP, fakes)
    assert (end, visited[-2:]) == ("Fail", ["ReportFailure", "Failed"])
    assert fakes.states(RUN_TASK) == ["RunTask"]
    [message] = fakes.published()
    assert said in check_message(message, "backup")["error"]


@pytest.mark.parametrize("error", ["ECS.AccessDeniedException", "States.Timeout",
                                   "ECS.InvalidParameterException"])
def test_a_task_that_could_not_be_run_or_followed_is_published(
        cfn: dict[str, Any], deployed: dict[str, Any], error: str) -> None:
    """Not every error of a task state has the stopped task as its Cause: only
    States.TaskFailed itself is read as one."""
    fakes = Fakes("fargate", tasks=[StatesError(error, "not a task")])
    visited, end, _ = run(deployed, cfn, BACKUP, fakes)
    assert (end, visited[-2:]) == ("Fail", ["ReportFailure", "Failed"])
    [message] = fakes.published()
    assert error in check_message(message, "backup")["error"]


@pytest.mark.parametrize("error", sorted(UNCATCHABLE))
@pytest.mark.parametrize("where", ["Plan", "InvokeBackup", "RunTask"])
def test_the_terminal_errors_are_caught_by_no_catch(
        cfn: dict[str, Any], deployed: dict[str, Any], error: str, where: str) -> None:
    """States.Runtime and States.DataLimitExceeded end the execution whatever its
    Catches say (the RunFailedAlarm tells): the definition must not raise them."""
    fakes = Fakes("fargate" if where == "RunTask" else "lambda")

    def failing(state: str, resource: str, parameters: dict[str, Any]) -> Any:
        if state == where:
            fakes.calls.append((state, resource, parameters))
            raise StatesError(error, "terminal")
        return fakes(state, resource, parameters)

    with pytest.raises(StatesError) as raised:
        run(deployed, cfn, BACKUP, failing)
    assert raised.value.error == error and not fakes.published()


@pytest.mark.parametrize("cause", ["", "not JSON", "Task failed: RESOURCE:MEMORY", "[1]"])
@pytest.mark.parametrize("execution, on_demand", [(BACKUP, False), (BACKUP, True),
                                                  (RESTORE, False)])
def test_a_task_failure_whose_cause_is_not_a_json_object_is_published(
        cfn: dict[str, Any], deployed: dict[str, Any], cause: str,
        execution: dict[str, Any], on_demand: bool) -> None:
    """States.StringToJson of anything but JSON text would fail the execution
    (States.Runtime, no Catch takes it): such a Cause goes to the report, named."""
    first = [task_failed(stop_code="SpotInterruption", exit_code=143)] if on_demand else []
    fakes = Fakes("fargate", tasks=[*first, StatesError("States.TaskFailed", cause)])
    visited, end, _ = run(deployed, cfn, execution, fakes)
    assert (end, visited[-2:]) == ("Fail", ["ReportFailure", "Failed"])
    assert "DescribeTaskError" in visited
    assert not {"ReadStoppedTask", "ReadStoppedOnDemandTask"} & set(visited[-6:])
    [message] = fakes.published()
    assert "States.TaskFailed" in check_message(message, execution["operation"])["error"]


def test_a_cause_is_read_as_json_only_behind_a_choice_that_checks_it(
        asl: dict[str, Any]) -> None:
    readers = {n: s for n, s in asl["States"].items()
               if "StringToJson($.error.Cause)" in json.dumps(s.get("Parameters", {}))}
    assert set(readers) == {"ReadStoppedTask", "ReadStoppedOnDemandTask"}
    for name in readers:
        entries = [(n, r) for n, s in asl["States"].items() for r in s.get("Choices", [])
                   if r["Next"] == name]
        assert [n for n, s in asl["States"].items() if name in targets(s)] == [
            n for n, _ in entries], name  # only a Choice's rule goes there
        for _, rule in entries:
            assert {"Variable": "$.error.Cause", "IsPresent": True} in rule["And"]
            assert {"Variable": "$.error.Cause", "StringMatches": "{*"} in rule["And"]
            assert {"Variable": "$.error.Error", "StringEquals": "States.TaskFailed"} in rule[
                "And"]


def test_a_plan_that_failed_on_an_input_without_an_operation_fails_at_once(
        cfn: dict[str, Any], deployed: dict[str, Any]) -> None:
    """The report reads $.operation: without one in the input (the plan function, which
    refuses such an input itself, having crashed or timed out) the execution fails, and
    the RunFailedAlarm tells; never States.Runtime on the way to the report."""
    fakes = Fakes(plan_error="Lambda.Unknown")
    visited, end, _ = run(deployed, cfn, {"event": {"kind": "full"}}, fakes)
    assert (end, visited) == ("Fail", ["Plan", "PlanFailed", "Failed"])
    assert not fakes.published()
    rule = deployed["States"]["PlanFailed"]["Choices"][0]
    assert {"Variable": "$.operation", "IsPresent": True} in rule["And"]


def test_a_restore_never_runs_on_spot_and_its_stop_is_published_not_retried(
        cfn: dict[str, Any], deployed: dict[str, Any], asl: dict[str, Any]) -> None:
    """A restore stopped midway leaves a partial target, on which a second run fails
    ("target is not empty"): on demand capacity only, and a stop goes to the report."""
    choice = asl["States"]["SpotOrOnDemand"]
    assert asl["States"]["PrepareTask"]["Next"] == "SpotOrOnDemand"
    assert choice["Choices"] == [{"Variable": "$.operation", "StringEquals": "backup",
                                  "Next": "RunTask"}]
    assert choice["Default"] == "RunTaskOnDemand"
    # RunTask, whose capacity is FARGATE_SPOT with TaskSpot true, only after that rule
    into_run_task = [n for n, s in asl["States"].items() if "RunTask" in targets(s)]
    assert into_run_task == ["SpotOrOnDemand"]
    on_demand = asl["States"]["RunTaskOnDemand"]["Parameters"]["CapacityProviderStrategy"]
    assert on_demand == [{"CapacityProvider": "FARGATE", "Weight": 1}]
    for stop_code, exit_code in (("SpotInterruption", 143), ("UserInitiated", 143),
                                 ("TaskFailedToStart", None)):
        fakes = Fakes("fargate", tasks=[task_failed(stop_code=stop_code,
                                                    exit_code=exit_code)])
        visited, end, _ = run(deployed, cfn, RESTORE, fakes)
        assert fakes.states(RUN_TASK) == ["RunTaskOnDemand"], stop_code
        assert (end, visited[-2:]) == ("Fail", ["ReportFailure", "Failed"])
        [message] = fakes.published()
        assert stop_code in check_message(message, "restore")["error"]


@pytest.mark.parametrize("state, result, kept", [
    ("InvokeBackup", BACKUP_RESULT, {"backup_id": BACKUP_RESULT["backup_id"], "kind": "full",
                                     "total_bytes": 123456, "duration_seconds": 61.5}),
    ("InvokeBackup", DUPLICATE_RESULT, {}),  # the plan's reason names the tick
    ("InvokeBackup", {"unexpected": "x" * 10000}, {}),
    ("InvokeRestore", DRY_RUN_RESULT, {"backup_id": DRY_RUN_RESULT["backup_id"],
                                       "method": "backup"}),
    ("InvokeRestore", RESTORE_RESULT, {"backup_id": RESTORE_RESULT["backup_id"],
                                       "method": "backup"}),
    ("InvokeRestore", {"method": "backup", "lines": ["x" * 10000]}, {}),
])
def test_a_run_on_lambda_keeps_only_a_few_fields_of_the_functions_result(
        cfn: dict[str, Any], deployed: dict[str, Any], state: str, result: dict[str, Any],
        kept: dict[str, Any]) -> None:
    """A restore's dry-run plan has a line per table part (thousands on a big database):
    the execution keeps named fields, far under 256 KiB; the rest is in the logs and on
    SNS. A result without them (a duplicate tick has no backup_id) is no States.Runtime."""
    execution = BACKUP if state == "InvokeBackup" else RESTORE
    fakes = Fakes("lambda", result=result)
    visited, end, output = run(deployed, cfn, execution, fakes)
    assert end == "Succeed" and state in visited
    assert output["result"] == {"path": "lambda", **kept}
    assert len(json.dumps(output)) < 2048


def test_the_lambda_results_are_cut_to_named_fields(asl: dict[str, Any]) -> None:
    """What each invoke keeps: Lambda's metadata dropped (ResultSelector), then only named
    fields of the payload, each read behind a Choice rule that checks it is there."""
    for invoke in ("InvokeBackup", "InvokeRestore"):
        state = asl["States"][invoke]
        assert state["ResultSelector"] == {"path": "lambda", "payload.$": "$.Payload"}
        assert state["ResultPath"] == "$.result" and state["Next"] == "KeepSummary"
    choice = asl["States"]["KeepSummary"]
    assert choice["Type"] == "Choice" and choice["Default"] == "NoSummary"
    assert [n for n, s in asl["States"].items() if "KeepSummary" in targets(s)] == [
        "InvokeBackup", "InvokeRestore"]
    summaries = {}
    for rule in choice["Choices"]:
        summary = asl["States"][rule["Next"]]
        assert summary["Type"] == "Pass" and summary["ResultPath"] == "$.result"
        assert summary["Next"] == "Done"
        assert all(r.get("IsPresent") is True for r in rule["And"])
        checked = {r["Variable"] for r in rule["And"]}
        read = {v for k, v in summary["Parameters"].items() if k.endswith(".$")}
        assert read == checked, rule["Next"]
        summaries[rule["Next"]] = summary["Parameters"]
    assert summaries == {
        "BackupSummary": {"path": "lambda", "backup_id.$": "$.result.payload.backup_id",
                          "kind.$": "$.result.payload.kind",
                          "total_bytes.$": "$.result.payload.bytes",
                          "duration_seconds.$": "$.result.payload.duration_seconds"},
        "RestoreSummary": {"path": "lambda", "backup_id.$": "$.result.payload.backup_id",
                           "method.$": "$.result.payload.method"}}
    assert asl["States"]["NoSummary"]["Parameters"] == {"path": "lambda"}


def test_the_definition_stays_within_what_cfn_lint_can_resolve(cfn: dict[str, Any]) -> None:
    """SAM makes the definition an Fn::Join of its JSON lines, and cfn-lint resolves a
    join one element per nested generator: past about 750 lines Python aborts the run
    ("Cannot recover from stack overflow", test_template's lint of the translated
    template). Room is kept; a longer definition needs a shorter one, not a bigger stack."""
    lines = cfn["Resources"][STATE_MACHINE]["Properties"]["DefinitionString"]["Fn::Join"][1]
    assert len(lines) <= 720, len(lines)


def test_the_task_workers_stay_within_the_engines_limit(cfn: dict[str, Any]) -> None:
    """SUPABACKUP_JOBS above tabledata.MAX_JOBS is refused: every Fargate run would be."""
    workers = cfn["Parameters"]["TaskWorkers"]
    assert workers["MaxValue"] == tabledata.MAX_JOBS
    assert workers["MinValue"] == 1 and workers["Default"] <= tabledata.MAX_JOBS
    assert str(tabledata.MAX_JOBS) in workers["Description"]


def test_a_report_that_cannot_be_published_still_fails_the_execution(
        cfn: dict[str, Any], deployed: dict[str, Any]) -> None:
    def no_sns(state: str, resource: str, parameters: dict[str, Any]) -> Any:
        if resource == PUBLISH:
            raise StatesError("SNS.AuthorizationErrorException", "denied")
        return Fakes(lambda_error="Lambda.Unknown")(state, resource, parameters)

    visited, end, _ = run(deployed, cfn, BACKUP, no_sns)
    assert (end, visited[-2:]) == ("Fail", ["ReportFailure", "Failed"])


def test_the_lambda_retries_wait_out_a_run_in_flight(cfn: dict[str, Any],
                                                     asl: dict[str, Any]) -> None:
    """Each function runs one at a time: a second execution's invoke is throttled until
    the first run ends (at most FunctionTimeout's maximum), then runs (a duplicate tick
    then does nothing). The engine's own errors are never retried."""
    longest = cfn["Parameters"]["FunctionTimeout"]["MaxValue"]
    for name in states_of(asl, LAMBDA, cfn):
        assert retry_seconds(asl, name, "Lambda.TooManyRequestsException") > longest
        retried = {e for r in asl["States"][name]["Retry"] for e in r["ErrorEquals"]}
        assert all(e.startswith("Lambda.") for e in retried) and "Lambda.Unknown" not in retried
        assert not retried & set(ENGINE_ERRORS)


# ------------------------------------------------------------------ the state machine's role


def role_statements(cfn: dict[str, Any], role: str) -> list[dict[str, Any]]:
    documents = [p["PolicyDocument"] for p in cfn["Resources"][role]["Properties"].get(
        "Policies", [])]
    for resource in cfn["Resources"].values():
        if resource["Type"] == "AWS::IAM::Policy" and {"Ref": role} in resource[
                "Properties"]["Roles"]:
            documents.append(resource["Properties"]["PolicyDocument"])
    statements = [s for doc in documents for s in as_list(doc["Statement"])]
    return [s["Fn::If"][1] if "Fn::If" in s else s for s in statements]


def granted(statements: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    found = [s for s in statements if action in as_list(s["Action"])]
    assert all(s["Effect"] == "Allow" for s in found)
    return found


def test_the_state_machine_role_grants_exactly_what_the_states_call(
        cfn: dict[str, Any], asl: dict[str, Any]) -> None:
    role = cfn["Resources"][STATE_MACHINE]["Properties"]["RoleArn"]["Fn::GetAtt"][0]
    trust = cfn["Resources"][role]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert [s["Principal"] for s in trust] == [{"Service": "states.amazonaws.com"}]
    statements = role_statements(cfn, role)

    # lambda:invoke: the functions the states name, nothing else
    [invoke] = granted(statements, "lambda:InvokeFunction")
    named = [substituted(cfn, s["Parameters"]["FunctionName"])
             for s in states_of(asl, LAMBDA, cfn).values()]
    assert sorted(map(json.dumps, as_list(invoke["Resource"]))) == sorted(map(json.dumps, named))

    # ecs:runTask.sync (research, item 2)
    runs = list(states_of(asl, RUN_TASK, cfn).values())
    task_definition = {json.dumps(substituted(cfn, r["Parameters"]["TaskDefinition"]))
                       for r in runs}
    cluster = {json.dumps(substituted(cfn, r["Parameters"]["Cluster"])) for r in runs}
    [run_task] = granted(statements, "ecs:RunTask")
    assert as_list(run_task["Action"]) == ["ecs:RunTask"]
    assert {json.dumps(run_task["Resource"])} == task_definition
    assert {json.dumps(run_task["Condition"]["ArnEquals"]["ecs:cluster"])} == cluster
    [follow] = granted(statements, "ecs:StopTask")
    assert set(as_list(follow["Action"])) == {"ecs:StopTask", "ecs:DescribeTasks"}
    cluster_id = json.loads(cluster.pop())["Fn::GetAtt"][0]
    assert follow["Resource"] == {"Fn::Sub": "arn:${AWS::Partition}:ecs:${AWS::Region}:"
                                            "${AWS::AccountId}:task/${" + cluster_id + "}/*"}
    [events] = granted(statements, "events:PutRule")
    assert set(as_list(events["Action"])) == {"events:PutTargets", "events:PutRule",
                                              "events:DescribeRule"}
    assert events["Resource"]["Fn::Sub"].endswith(":rule/StepFunctionsGetEventsForECSTaskRule")
    [passing] = granted(statements, "iam:PassRole")
    task = cfn["Resources"][json.loads(task_definition.pop())["Ref"]]["Properties"]
    assert sorted(map(json.dumps, passing["Resource"])) == sorted(
        map(json.dumps, [task["TaskRoleArn"], task["ExecutionRoleArn"]]))
    assert passing["Condition"] == {"StringEquals": {
        "iam:PassedToService": "ecs-tasks.amazonaws.com"}}

    # sns:publish to the topic, and the topic's key through SNS only
    [(_, report)] = states_of(asl, PUBLISH, cfn).items()
    [publish] = granted(statements, "sns:Publish")
    assert publish["Resource"] == substituted(cfn, report["Parameters"]["TopicArn"])
    [key] = granted(statements, "kms:GenerateDataKey")
    assert key["Resource"] == cfn["Resources"]["NotificationTopic"]["Properties"][
        "KmsMasterKeyId"]
    assert key["Condition"] == {"StringEquals": {
        "kms:ViaService": {"Fn::Sub": "sns.${AWS::Region}.amazonaws.com"}}}
    assert {"Fn::GetAtt": [role, "Arn"]} in key_users(cfn)

    # nothing else but the log delivery (no resource-level permissions exist for it)
    actions = {a for s in statements for a in as_list(s["Action"])}
    others = actions - {"lambda:InvokeFunction", "ecs:RunTask", "ecs:StopTask",
                        "ecs:DescribeTasks", "events:PutTargets", "events:PutRule",
                        "events:DescribeRule", "iam:PassRole", "sns:Publish", "kms:Decrypt",
                        "kms:GenerateDataKey"}
    assert others == LOG_DELIVERY
    for statement in statements:
        if statement["Resource"] == "*":
            assert all(a in others for a in as_list(statement["Action"])), statement
    # X-Ray (Tracing): with a role of its own, SAM adds nothing
    assert {"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/AWSXRayDaemonWriteAccess"} in (
        cfn["Resources"][role]["Properties"]["ManagedPolicyArns"])


# Step Functions' logging through CloudWatch Logs' vended logs (no resource-level
# permissions exist for these: Resource "*").
LOG_DELIVERY = {"logs:CreateLogDelivery", "logs:GetLogDelivery", "logs:UpdateLogDelivery",
                "logs:DeleteLogDelivery", "logs:ListLogDeliveries", "logs:PutResourcePolicy",
                "logs:DescribeResourcePolicies", "logs:DescribeLogGroups"}


def layer(cfn: dict[str, Any]) -> dict[str, str]:
    """{"Ref": <the layer>}: SAM renames the layer version (a hash of its content)."""
    [ref] = cfn["Resources"]["BackupFunction"]["Properties"]["Layers"]
    assert cfn["Resources"][ref["Ref"]]["Type"] == "AWS::Lambda::LayerVersion"
    return dict(ref)


def key_users(cfn: dict[str, Any]) -> list[Any]:
    statements = cfn["Resources"]["BackupKey"]["Properties"]["KeyPolicy"]["Statement"]
    [users] = [s for s in statements if s.get("Sid") == "FunctionsUseTheKey"]
    return list(users["Principal"]["AWS"])


# ------------------------------------------------------------------ alarms and schedules


def test_a_failed_timed_out_or_aborted_execution_alarms(cfn: dict[str, Any]) -> None:
    alarm = cfn["Resources"]["RunFailedAlarm"]["Properties"]
    stats = [m["MetricStat"] for m in alarm["Metrics"] if "MetricStat" in m]
    [expression] = [m for m in alarm["Metrics"] if m.get("ReturnData")]
    assert expression["Expression"] == "SUM(METRICS())"
    assert sorted(s["Metric"]["MetricName"] for s in stats) == [
        "ExecutionsAborted", "ExecutionsFailed", "ExecutionsTimedOut"]
    for stat in stats:
        assert stat["Metric"]["Namespace"] == "AWS/States" and stat["Stat"] == "Sum"
        assert stat["Metric"]["Dimensions"] == [{"Name": "StateMachineArn",
                                                 "Value": {"Ref": STATE_MACHINE}}]
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (
        1, "GreaterThanOrEqualToThreshold")
    assert alarm["TreatMissingData"] == "notBreaching"
    assert alarm["AlarmActions"] == [{"Ref": "NotificationTopic"}]


@pytest.mark.parametrize("kind, sample", [("full", "backup-full-scheduled.json"),
                                          ("incremental", "backup-incremental-scheduled.json")])
def test_the_backup_schedules_start_the_state_machine_with_the_sample_event(
        cfn: dict[str, Any], deployed: dict[str, Any], kind: str, sample: str) -> None:
    [schedule] = [r["Properties"] for r in cfn["Resources"].values()
                  if r["Type"] == "AWS::Scheduler::Schedule"
                  and json.loads(r["Properties"]["Target"]["Input"]).get("event", {}).get(
                      "kind") == kind]
    assert schedule["Target"]["Arn"] == {"Ref": STATE_MACHINE}
    sent = json.loads(schedule["Target"]["Input"])
    assert set(sent) == {"operation", "event"} and sent["operation"] == "backup"
    event = sent["event"]
    sample_event = json.loads((EVENTS / sample).read_text())
    assert event.pop("tick") == "<aws.scheduler.scheduled-time>"
    assert event == {k: v for k, v in sample_event.items() if k != "tick"}
    # what the state machine then does with it: the function gets the event alone
    fakes = Fakes("lambda")
    run(deployed, cfn, {"operation": "backup", "event": sample_event}, fakes)
    assert fakes.calls[1][2]["Payload"] == sample_event
    # the scheduler may start this state machine, nothing else
    role = cfn["Resources"][schedule["Target"]["RoleArn"]["Fn::GetAtt"][0]]["Properties"]
    started = [s for p in role["Policies"] for s in as_list(p["PolicyDocument"]["Statement"])
               if "states:StartExecution" in as_list(s["Action"])]
    assert [s["Resource"] for s in started] == [{"Ref": STATE_MACHINE}]
    # no backup schedule invokes the function beside it: one tick, one execution
    function_targets = [r["Properties"]["Target"]["Arn"] for r in cfn["Resources"].values()
                        if r["Type"] == "AWS::Scheduler::Schedule"]
    assert {"Fn::GetAtt": ["BackupFunction", "Arn"]} not in function_targets


@pytest.mark.parametrize("sample, parse", [("backup-large.json", parse_backup_event),
                                           ("restore-large.json", parse_restore_event)])
def test_the_large_samples_are_state_machine_inputs(cfn: dict[str, Any], sample: str,
                                                    parse: Callable[..., Any]) -> None:
    sent = json.loads((EVENTS / sample).read_text())
    assert set(sent) == {"operation", "event"}
    assert sent["operation"] == sample.split("-")[0]
    parse(sent["event"])
    command = cfn["Outputs"][{"backup": "ManualLargeBackupCommand",
                              "restore": "RestoreLargeCommand"}[sent["operation"]]]
    text = command["Value"]["Fn::Sub"]
    assert text.startswith("aws stepfunctions start-execution ")
    assert "--state-machine-arn ${RunStateMachine}" in text and f"file://events/{sample}" in text


# ------------------------------------------------------------------ the task


def task_environment(cfn: dict[str, Any]) -> dict[str, Any]:
    """The container's environment; an entry set only under a condition as
    {"Fn::If": [condition, value, AWS::NoValue]}, as a function's variable would be."""
    [container] = cfn["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"]
    env: dict[str, Any] = {}
    for entry in container["Environment"]:
        if "Fn::If" in entry:
            condition, pair, none = entry["Fn::If"]
            assert none == {"Ref": "AWS::NoValue"}
            env[pair["Name"]] = {"Fn::If": [condition, pair["Value"], none]}
        else:
            assert entry["Name"] not in env, entry
            env[entry["Name"]] = entry["Value"]
    return env


def same_setting(cfn: dict[str, Any], function_value: Any, task_value: Any) -> bool:
    """Equal, or the function's {"Ref": P} (P empty by default) as the task's
    {"Fn::If": [HasP, {"Ref": P}, NoValue]} where HasP is exactly "P is not empty": the
    handlers treat an empty variable as an absent one."""
    if function_value == task_value:
        return True
    if set(function_value) == {"Ref"} and isinstance(task_value, dict) and "Fn::If" in task_value:
        condition, value, _ = task_value["Fn::If"]
        return value == function_value and cfn["Conditions"][condition] == {
            "Fn::Not": [{"Fn::Equals": [function_value, ""]}]}
    return False


def test_the_task_runs_with_the_backup_and_restore_functions_configuration(
        cfn: dict[str, Any]) -> None:
    env = task_environment(cfn)
    for function in ("BackupFunction", "RestoreFunction"):
        variables = cfn["Resources"][function]["Properties"]["Environment"]["Variables"]
        for name, value in variables.items():
            assert name in env, (function, name)
            assert same_setting(cfn, value, env[name]), (function, name, env[name])
    own = {"SUPABACKUP_JOBS": {"Ref": "TaskWorkers"},
           "SUPABACKUP_CODE_FUNCTION": {"Ref": "BackupFunction"},
           "SUPABACKUP_LAYER_ARN": layer(cfn),
           "SUPABACKUP_CODE_DIR": "/var/task", "SUPABACKUP_LAYER_DIR": "/opt",
           "PYTHONPATH": "/var/task", "AWS_DEFAULT_REGION": {"Ref": "AWS::Region"}}
    for name, value in own.items():
        assert env[name] == value, name
    functions = set().union(*(cfn["Resources"][f]["Properties"]["Environment"]["Variables"]
                              for f in ("BackupFunction", "RestoreFunction")))
    assert set(env) == functions | set(own) | {"SUPABACKUP_TIME_LIMIT"}
    # the engine's code comes from the backup function, whose layer is the one named
    assert cfn["Resources"]["BackupFunction"]["Properties"]["Layers"] == [layer(cfn)]
    assert default(cfn, {"Ref": "TaskWorkers"}) == 8


def test_the_task_definition(cfn: dict[str, Any]) -> None:
    task = cfn["Resources"]["TaskDefinition"]["Properties"]
    assert task["RequiresCompatibilities"] == ["FARGATE"] and task["NetworkMode"] == "awsvpc"
    assert (task["Cpu"], task["Memory"]) == ({"Ref": "TaskCpu"}, {"Ref": "TaskMemory"})
    assert task["RuntimePlatform"]["CpuArchitecture"] == {"Fn::If": ["IsArm64", "ARM64",
                                                                     "X86_64"]}
    assert cfn["Conditions"]["IsArm64"] == {"Fn::Equals": [{"Ref": "Architecture"}, "arm64"]}
    assert task["TaskRoleArn"] != task["ExecutionRoleArn"]
    [container] = task["ContainerDefinitions"]
    assert container["Essential"] is True and container["ReadonlyRootFilesystem"] is True
    volumes = {v["Name"] for v in task["Volumes"]}
    mounts = {m["ContainerPath"]: m["SourceVolume"] for m in container["MountPoints"]}
    env = task_environment(cfn)
    # the bootstrap writes the code and the layer where the task's PYTHONPATH and the
    # image's PATH (/opt/bin) look, on the task's own disk; pg_dump writes to /tmp
    assert set(mounts) == {env["SUPABACKUP_CODE_DIR"], env["SUPABACKUP_LAYER_DIR"],
                           "/tmp"}  # noqa: S108 - the container's, not ours
    assert set(mounts.values()) == volumes and len(volumes) == 3
    assert env["PYTHONPATH"] == env["SUPABACKUP_CODE_DIR"]
    assert container["StopTimeout"] == 120  # the most ECS allows: the engine stops cleanly
    assert container["LinuxParameters"]["InitProcessEnabled"] is True
    options = container["LogConfiguration"]["Options"]
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    assert options["awslogs-group"] == {"Ref": "TaskLogGroup"}
    assert options["mode"] == "blocking" and "awslogs-multiline-pattern" not in options
    assert cfn["Resources"]["TaskLogGroup"]["Properties"]["RetentionInDays"] == {
        "Ref": "LogRetentionDays"}
    storage = task["EphemeralStorage"]["Fn::If"]
    assert storage[0] == "HasExtraTaskStorage" and storage[2] == {"Ref": "AWS::NoValue"}
    assert cfn["Parameters"]["TaskEphemeralStorageGiB"]["Default"] == 20  # what is free
    # the key only above it (the API's minimum is 21)
    assert cfn["Conditions"]["HasExtraTaskStorage"] == {"Fn::Not": [{"Fn::Equals": [
        {"Ref": "TaskEphemeralStorageGiB"}, "20"]}]}
    assert cfn["Parameters"]["TaskEphemeralStorageGiB"]["MinValue"] == 20
    assert cfn["Parameters"]["TaskImage"]["Default"].startswith("public.ecr.aws/lambda/python:3.12")


# Fargate's sizes (research, item 7): CPU -> the memory it accepts, in MiB.
FARGATE_SIZES = {"1024": range(2048, 8192 + 1, 1024), "2048": range(4096, 16384 + 1, 1024),
                 "4096": range(8192, 30720 + 1, 1024), "8192": range(16384, 61440 + 1, 4096),
                 "16384": range(32768, 122880 + 1, 8192)}


def test_the_task_size_rules_accept_exactly_fargates_sizes(cfn: dict[str, Any]) -> None:
    sam_rules = cfn["Rules"]
    cpus = cfn["Parameters"]["TaskCpu"]["AllowedValues"]
    assert set(cpus) == set(FARGATE_SIZES)
    found = {}
    for rule in sam_rules.values():
        condition = rule.get("RuleCondition", {})
        if condition.get("Fn::Equals", [None])[0] == {"Ref": "TaskCpu"}:
            [assertion] = rule["Assertions"]
            allowed, ref = assertion["Assert"]["Fn::Contains"]
            assert ref == {"Ref": "TaskMemory"}
            found[condition["Fn::Equals"][1]] = [int(m) for m in allowed]
    assert found == {cpu: list(sizes) for cpu, sizes in FARGATE_SIZES.items()}
    params = cfn["Parameters"]
    assert int(params["TaskMemory"]["Default"]) in FARGATE_SIZES[params["TaskCpu"]["Default"]]


def test_the_task_role_is_the_backup_and_restore_functions_rights_and_the_code(
        cfn: dict[str, Any]) -> None:
    task = cfn["Resources"]["TaskDefinition"]["Properties"]
    role = task["TaskRoleArn"]["Fn::GetAtt"][0]
    trust = cfn["Resources"][role]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert [s["Principal"] for s in trust] == [{"Service": "ecs-tasks.amazonaws.com"}]
    assert trust[0]["Condition"]["StringEquals"] == {"aws:SourceAccount": {
        "Ref": "AWS::AccountId"}}
    mine = {(a, json.dumps(s["Resource"], sort_keys=True)) for s in role_statements(cfn, role)
            for a in as_list(s["Action"])}
    theirs = {(a, json.dumps(s["Resource"], sort_keys=True))
              for f in ("BackupFunctionRole", "RestoreFunctionRole")
              for s in role_statements(cfn, f) for a in as_list(s["Action"])
              if not a.startswith(("logs:", "sqs:"))}  # their own log group, DLQ
    code = {("lambda:GetFunction", json.dumps({"Fn::GetAtt": ["BackupFunction", "Arn"]})),
            ("lambda:GetLayerVersion", json.dumps(layer(cfn)))}
    assert mine == theirs | code
    assert {"Fn::GetAtt": [role, "Arn"]} in key_users(cfn)
    # the execution role: the task's log stream, nothing else
    execution = task["ExecutionRoleArn"]["Fn::GetAtt"][0]
    statements = role_statements(cfn, execution)
    assert {a for s in statements for a in as_list(s["Action"])} == {
        "logs:CreateLogStream", "logs:PutLogEvents"}
    assert all(s["Resource"] == {"Fn::GetAtt": ["TaskLogGroup", "Arn"]} for s in statements)
    assert not cfn["Resources"][execution]["Properties"].get("ManagedPolicyArns")


def test_the_plan_function_only_reads(cfn: dict[str, Any]) -> None:
    fn = cfn["Resources"]["PlanFunction"]["Properties"]
    role = fn["Role"]["Fn::GetAtt"][0]
    actions = {a for s in role_statements(cfn, role) for a in as_list(s["Action"])}
    assert actions == {"logs:CreateLogStream", "logs:PutLogEvents", "s3:GetObject",
                       "s3:ListBucket", "secretsmanager:GetSecretValue", "kms:Decrypt",
                       "kms:GenerateDataKey", "sns:Publish"}
    env = fn["Environment"]["Variables"]
    assert env["SUPABACKUP_LAMBDA_TIMEOUT"] == {"Ref": "FunctionTimeout"}
    assert env["SUPABACKUP_FARGATE"] == {"Fn::If": ["HasTaskNetwork", "true", "false"]}
    assert cfn["Conditions"]["HasTaskNetwork"] == {"Fn::Not": [{"Fn::Equals": [
        {"Fn::Join": ["", {"Ref": "TaskSubnetIds"}]}, ""]}]}
    backup = cfn["Resources"]["BackupFunction"]["Properties"]["Environment"]["Variables"]
    # it reads and checks the event as the backup function does, and the same database
    for name in ("SUPABACKUP_DB_SECRET_ARN", "SUPABACKUP_STORE", "SUPABACKUP_PROFILE",
                 "SUPABACKUP_SNS_TOPIC_ARN"):
        assert env[name] == backup[name], name
    assert fn["VpcConfig"] == cfn["Resources"]["BackupFunction"]["Properties"]["VpcConfig"]
    assert {"Fn::GetAtt": [role, "Arn"]} in key_users(cfn)


def bootstrap(cfn: dict[str, Any]) -> tuple[list[str], str]:
    [container] = cfn["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"]
    [command] = container["Command"]
    return container["EntryPoint"], command


def test_the_bootstrap_is_python_that_compiles_and_reads_only_its_environment(
        cfn: dict[str, Any]) -> None:
    entry_point, command = bootstrap(cfn)
    assert entry_point == ["/var/lang/bin/python3.12", "-c"]  # the Lambda base image's
    compile(command, "<bootstrap>", "exec")
    env = task_environment(cfn)
    read = set(re.findall(r'os\.environ\["(\w+)"\]', command))
    assert read == {"SUPABACKUP_CODE_FUNCTION", "SUPABACKUP_CODE_DIR", "SUPABACKUP_LAYER_ARN",
                    "SUPABACKUP_LAYER_DIR"}
    assert read <= set(env)
    assert "os.environ.get" not in command and "getenv" not in command
    # it verifies what it downloads, keeps file modes, fails in one line with 3, and
    # becomes the task runner
    assert "CodeSha256" in command and "external_attr" in command and "chmod" in command
    assert "sys.exit(3)" in command and "file=sys.stderr" in command
    assert '"-m", "supabackup.handlers.task"' in command
    # boto3 and the standard library only: the image has nothing else
    imported = set(re.findall(r"^import ([\w., ]+)$", command, re.M))
    modules = {m.strip() for line in imported for m in line.split(",")}
    assert modules == {"base64", "hashlib", "io", "os", "sys", "urllib.request", "zipfile",
                       "boto3"}
