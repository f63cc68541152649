"""Tool calls: a reply that calls one of the request's functions, as a model does when it is offered tools.

Agents (the SDK's function-calling helpers, LangChain's ``bind_tools``, agent loops) need the model to call
a tool, then, once the client sends the tool's result back, to answer in words. The simulator does exactly
that, deterministically: while the conversation does not end with a tool's result, a request that offers
functions (and does not say ``tool_choice: "none"``) gets a call to the first of them, or to the one
``tool_choice`` names; its arguments are an instance of the function's ``parameters`` schema
(`structured.instance`). The result message ends the loop: the next reply is words.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from .structured import SchemaError

#: Parameters of a function that declares none: the API calls it with ``{}``.
NO_PARAMETERS: Final = {"type": "object", "properties": {}}


@attrs.frozen
class ToolCall:
    """The function a reply calls and the schema its arguments follow."""

    name: str
    parameters: dict[str, Any]


def requested_tool_call(kind: str, body: dict[str, Any]) -> ToolCall | None:
    """The function the reply calls, or None for a reply in words.

    Raises:
        SchemaError: ``tools`` or ``tool_choice`` has a shape the API would reject (a 400 naming it).
    """
    if kind not in ("chat", "responses") or body.get("tools") is None:
        return None
    functions = _functions(kind, body["tools"])
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        # {"type": "allowed_tools", "mode": "auto" | "required", "tools": [...]} (chat nests it under
        # "allowed_tools"): the model may call only those, as the mode says.
        allowed = choice.get("allowed_tools", choice) if kind == "chat" else choice
        names = {_tool_name(tool) for tool in allowed.get("tools") or []} if isinstance(allowed, dict) else set()
        functions = [function for function in functions if function.name in names]
        choice = allowed.get("mode", "auto") if isinstance(allowed, dict) else "auto"
    elif isinstance(choice, dict) and choice.get("type") != "function":
        choice = "auto"  # a built-in tool (file search, web search, MCP…): not simulated, so words or a function
    if choice is None:
        choice = "auto"
    if choice == "none" or not functions:
        return None
    if isinstance(choice, dict):
        # Chat names the function under "function"; Responses beside "type".
        holder = choice.get("function") if kind == "chat" else choice
        name = holder.get("name") if isinstance(holder, dict) else None
        chosen = next((function for function in functions if function.name == name), None)
        if chosen is None:
            raise SchemaError(f"Invalid value for 'tool_choice': no function named {name!r} in 'tools'.", "tool_choice")
        return chosen if not _answers_a_tool(kind, body) else None
    if choice not in ("auto", "required"):
        raise SchemaError(
            "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or a function.", "tool_choice"
        )
    return functions[0] if not _answers_a_tool(kind, body) else None


def _functions(kind: str, tools: Any) -> list[ToolCall]:
    if not isinstance(tools, list):
        raise SchemaError("Invalid type for 'tools': expected an array of tools.", "tools")
    functions = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue  # built-in tools (web search, file search…) are not simulated
        spec = tool.get("function") if kind == "chat" else tool
        where = f"tools[{index}].function" if kind == "chat" else f"tools[{index}]"
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name:
            raise SchemaError(f"Missing required parameter: '{where}.name'.", f"{where}.name")
        assert isinstance(spec, dict)
        parameters = spec.get("parameters")
        # Arguments are always a JSON object: a schema without an object root ({}) gets none of its own.
        if not (isinstance(parameters, dict) and (parameters.get("type") == "object" or "properties" in parameters)):
            parameters = NO_PARAMETERS
        functions.append(ToolCall(name, parameters))
    return functions


def _tool_name(tool: Any) -> Any:
    """The function name in an ``allowed_tools`` entry: chat nests it under "function", Responses does not."""
    if not isinstance(tool, dict):
        return None
    function = tool.get("function")
    return function.get("name") if isinstance(function, dict) else tool.get("name")


def _answers_a_tool(kind: str, body: dict[str, Any]) -> bool:
    """Whether the conversation ends with a tool's result: the model then answers in words."""
    items = body.get("messages" if kind == "chat" else "input")
    if not (isinstance(items, list) and items and isinstance(items[-1], dict)):
        return False
    last = items[-1]
    return last.get("role") in ("tool", "function") if kind == "chat" else last.get("type") == "function_call_output"
