"""Text of many kinds that the tokenizer tests run over."""

SAMPLES = [
    "Hello, world! This is a plain English sentence.",
    "The quick brown fox jumps over the lazy dog. It's 12:45 and we've 3,141,592 items; I'll go.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\nprint(fib(30))\n",
    '#include <stdio.h>\nint main(void) {\n\tprintf("%d\\n", 42);\n\treturn 0;\n}\n',
    "日本語のテキストと中文文本，还有한국어 문장。",
    "مرحبا بالعالم، هذا نص عربي.",
    "नमस्ते दुनिया, यह हिंदी पाठ है।",
    "Привет, мир! Это русский текст с числами 2024 и 1812.",
    "Emoji: 😀🎉👩‍👩‍👧‍👦🏳️‍🌈 and flags 🇫🇷🇯🇵, with a skin tone 👍🏽.",
    "   leading spaces, trailing spaces   \n\n\n\t\ttabs\r\nwindows newline\u00a0nbsp\u2003em space",
    "digits 0123456789 1234567890123 3.14159e-10 -42 +7 1,000,000",
    "Mixed: résumé naïve façade Ångström Œuvre ß ﬁ ligature",
    "URLs https://example.com/path?q=1&r=2#frag and emails someone@example.org",
    'JSON {"key": [1, 2, {"nested": null}], "ok": true}',
    "",
    " ",
    "\n",
    "a",
]
