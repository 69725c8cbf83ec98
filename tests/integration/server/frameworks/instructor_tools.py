"""instructor's TOOLS mode with retries against a live server; run by test_agent_frameworks.py in
instructor's own venv (its openai pin is older than ours). argv: base_url model. Exit 0: an answer or
the tiny model's retries ran out; exit 1 with the error: an HTTP error from the server."""

from __future__ import annotations

import sys

import instructor
import openai
from instructor.core.exceptions import InstructorRetryException
from pydantic import BaseModel, Field


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)


def main(base_url: str, model: str) -> int:
    client = instructor.from_openai(
        openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0), mode=instructor.Mode.TOOLS
    )
    try:
        city = client.chat.completions.create(
            model=model,
            response_model=City,
            max_retries=2,
            max_tokens=60,
            messages=[{"role": "user", "content": "Paris is in which country?"}],
        )
    except InstructorRetryException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, openai.APIStatusError):
            print(f"HTTP {cause.status_code}: {cause.message}")
            return 1
        print(f"retries ran out (model quality): {exc}")
        return 0
    except openai.APIStatusError as exc:
        print(f"HTTP {exc.status_code}: {exc.message}")
        return 1
    print(city.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
