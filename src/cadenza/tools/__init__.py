"""Function calling: tool definitions and ``tool_choice`` (spec), the model-family formats a
tool call is written in (parsers: hermes, llama3_json, mistral), how tools reach the chat
template (template), and the grammar that forces a call for ``tool_choice`` ``required`` or a
named function (the parsers build it). Torch-free; the server and the session layer use it.
"""
