"""The prompt tgi_nb's RAG chain sends, shipped as text: LangChain's ``hub.pull("rlm/rag-prompt")`` needs the
network, and a small model answers better with numbered passages it is asked to cite.
"""

from __future__ import annotations

from langchain_core.prompts import ChatPromptTemplate

RAG_SYSTEM_PROMPT = (
    "You are an assistant for question-answering tasks. Answer the question using only the numbered context "
    "passages below, and cite the passages you used by their numbers in square brackets, like [1] or [2]. "
    "If the context does not contain the answer, say that you don't know. Keep the answer to three sentences "
    "at most.\n\nContext:\n{context}"
)


def rag_prompt() -> ChatPromptTemplate:
    """The chat prompt of the RAG chain: a system message with the numbered ``{context}``, then ``{question}``.

    Example:
        >>> rag_prompt().invoke({"context": "[1] Paris is in France.", "question": "Where is Paris?"}).to_messages()[1].content
        'Where is Paris?'
    """
    return ChatPromptTemplate.from_messages([("system", RAG_SYSTEM_PROMPT), ("human", "{question}")])
