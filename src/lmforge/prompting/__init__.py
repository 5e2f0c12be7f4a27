"""Prompting over any model lmforge loads or any OpenAI-compatible endpoint: templates and few-shot selection,
chain of thought, self-consistency, Auto-CoT, and ReAct agents with tools.

    from lmforge.prompting import EngineClient, HTTPClient, ChainOfThought, ReActAgent, calculator_tool
"""

from lmforge import lazy_exports

_EXPORTS = {
    "Sampling": "lmforge.infer.client", "Completion": "lmforge.infer.client",
    "ModelClient": "lmforge.infer.client", "EngineClient": "lmforge.infer.client",
    "HTTPClient": "lmforge.infer.client", "ClientError": "lmforge.infer.client",
    "PromptTemplate": "lmforge.prompting.fewshot", "ExampleSelector": "lmforge.prompting.fewshot",
    "ChainOfThought": "lmforge.prompting.reasoning", "extract_answer": "lmforge.prompting.reasoning",
    "majority_vote": "lmforge.prompting.reasoning", "self_consistency": "lmforge.prompting.reasoning",
    "auto_cot": "lmforge.prompting.reasoning", "compare_methods": "lmforge.prompting.reasoning",
    "ReActAgent": "lmforge.prompting.agent", "Tool": "lmforge.prompting.tools",
    "calculator_tool": "lmforge.prompting.tools", "python_tool": "lmforge.prompting.tools",
    "search_tool": "lmforge.prompting.tools", "function_tool": "lmforge.prompting.tools",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(globals(), _EXPORTS)
