#!/usr/bin/env python3
"""Evaluates deploy/admission-node.yaml's policy, as rendered, against the writes it must let
through and the ones it must refuse, with a CEL interpreter (cel-python). The API server's CEL
adds Kubernetes libraries the policy does not use; what the server does around the expressions
(matchConditions first, then variables, then each validation in turn; an error under
failurePolicy Fail refuses) is modelled here. Usage: admission-check.py RENDERED.yaml
"""
import sys

import uuid

import celpy
import yaml

NODE_CLAIM = "authentication.kubernetes.io/node-name"
NODE_SA = "system:serviceaccount:node-local-cache:node-local-cache-node"
NODE = "ip-10-0-1-23.eu-west-1.compute.internal"
# A node name as long as the API allows, and one character short of needing a hash
# (src/cleanup/record.rs, node_object_name: "nlc-node-" + node fits 253 characters).
LONG = "n" * 250
LONGEST_SPELLED = "n" * 244
# A name-based UUID (v5) of the node, as node_object_name makes it from its NODE_NAMESPACE.
HASHED = "nlc-node-" + str(uuid.uuid5(uuid.UUID("6d1e2b0a-55c4-4f7e-8a3b-0c9de1f2a3b4"), LONG))


def configmap(name, node=None, labels=None, **extra):
    obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}
    if labels is not None:
        obj["metadata"]["labels"] = labels
    if node is not None:
        obj["data"] = {"node": node, "done": "", **extra}
    return obj


NODE_LABELS = {"node-local-cache.csi.io/cleanup-node": ""}


def request(user, node=None, op="UPDATE"):
    # The API server leaves out an empty extra (omitempty), as for a token without claims.
    info = {"username": user}
    if node is not None:
        info["extra"] = {NODE_CLAIM: [node]}
    return {"operation": op, "userInfo": info}


# (what, request, object, expected: "allowed" | "denied")
CASES = [
    ("its own object, created", request(NODE_SA, NODE, "CREATE"), configmap(f"nlc-node-{NODE}", NODE), "allowed"),
    ("its own object, patched", request(NODE_SA, NODE), configmap(f"nlc-node-{NODE}", NODE), "allowed"),
    ("another node's object", request(NODE_SA, NODE), configmap("nlc-node-other", "other"), "denied"),
    ("its own object naming another node", request(NODE_SA, NODE), configmap(f"nlc-node-{NODE}", "other"), "denied"),
    ("a new object naming another node", request(NODE_SA, NODE, "CREATE"), configmap("nlc-node-x", "x"), "denied"),
    ("its own object without data", request(NODE_SA, NODE), configmap(f"nlc-node-{NODE}"), "denied"),
    ("its own object as the driver writes it", request(NODE_SA, NODE), configmap(f"nlc-node-{NODE}", NODE, NODE_LABELS), "allowed"),
    (
        "its own object dressed as a record",
        request(NODE_SA, NODE),
        configmap(f"nlc-node-{NODE}", NODE, {**NODE_LABELS, "node-local-cache.csi.io/cleanup": "pending"}),
        "denied",
    ),
    (
        "its own object with a record's data",
        request(NODE_SA, NODE),
        configmap(f"nlc-node-{NODE}", NODE, NODE_LABELS, volumeId="nlc-0123", requestedAt="2999-01-01T00:00:00.000Z"),
        "denied",
    ),
    ("the cleanup index", request(NODE_SA, NODE), configmap("nlc-cleanup-index"), "denied"),
    ("a cleanup record", request(NODE_SA, NODE, "CREATE"), configmap("nlc-cleanup-nlc-0123"), "denied"),
    ("a token without any extra", request(NODE_SA), configmap(f"nlc-node-{NODE}", NODE), "denied"),
    (
        "the same account in another namespace",
        request("system:serviceaccount:other-ns:node-local-cache-node", NODE),
        configmap("nlc-cleanup-index"),
        "denied",
    ),
    ("the controller, the index", request("system:serviceaccount:node-local-cache:node-local-cache-controller"), configmap("nlc-cleanup-index"), "allowed"),
    ("another user", request("alice"), configmap("nlc-node-other", "other"), "allowed"),
    ("the longest spelled-out name", request(NODE_SA, LONGEST_SPELLED), configmap(f"nlc-node-{LONGEST_SPELLED}", LONGEST_SPELLED), "allowed"),
    ("that node, another object", request(NODE_SA, LONGEST_SPELLED), configmap("nlc-node-0f1e2d3c", LONGEST_SPELLED), "denied"),
    ("a hashed name", request(NODE_SA, LONG), configmap(HASHED, LONG), "allowed"),
    ("a long-named node, a spelled-out node's object", request(NODE_SA, LONG), configmap("nlc-node-other", LONG), "denied"),
    ("a hashed name naming another node", request(NODE_SA, LONG), configmap(HASHED, "x"), "denied"),
]


def evaluate(env, expression, activation):
    return env.program(env.compile(expression)).evaluate(activation)


def decide(policy, req, obj):
    """"allowed" or "denied: <why>", as the API server decides for an object in the policy's namespace."""
    env = celpy.Environment()
    activation = {"request": celpy.json_to_cel(req), "object": celpy.json_to_cel(obj)}
    fail = policy["spec"].get("failurePolicy", "Fail") == "Fail"
    try:
        for cond in policy["spec"].get("matchConditions", []):
            if not evaluate(env, cond["expression"], activation):
                return "allowed"
        variables = {}
        for var in policy["spec"].get("variables", []):
            activation["variables"] = celpy.json_to_cel(variables)
            variables[var["name"]] = evaluate(env, var["expression"], activation)
        activation["variables"] = celpy.json_to_cel(variables)
        for rule in policy["spec"]["validations"]:
            if not evaluate(env, rule["expression"], activation):
                why = rule.get("message") or evaluate(env, rule["messageExpression"], activation)
                return f"denied: {why}"
    except Exception as e:  # an expression that fails to evaluate
        return f"denied: error: {e}" if fail else "allowed"
    return "allowed"


def main():
    with open(sys.argv[1]) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    policies = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    bindings = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert len(policies) == 1, f"{len(policies)} policies rendered"
    policy = policies[0]
    name = policy["metadata"]["name"]
    assert [b["spec"]["policyName"] for b in bindings] == [name], "one binding, to the policy"
    assert bindings[0]["spec"]["validationActions"] == ["Deny"], "the binding refuses"
    ops = policy["spec"]["matchConstraints"]["resourceRules"][0]["operations"]
    assert sorted(ops) == ["CREATE", "UPDATE"], f"operations {ops}"
    failed = 0
    for what, req, obj, want in CASES:
        got = decide(policy, req, obj)
        ok = got.split(":")[0] == want
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}: {got}" + ("" if ok else f" (expected {want})"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
