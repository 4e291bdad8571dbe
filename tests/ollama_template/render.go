// Renders an Ollama Modelfile TEMPLATE with Go's own text/template, the engine Ollama uses, so
// the tests can compare it byte for byte with the trained model's Jinja chat template.
//
//	go run render.go TEMPLATE_FILE CASES_JSON > RENDERED_JSON
//
// CASES_JSON is a list of {"System": "...", "Messages": [{"Role": "user", "Content": "..."}]},
// the values Ollama gives a chat template (.System, .Messages; .Prompt and .Response are empty
// in chat requests). The output is the list of rendered prompts, in order. Only the standard
// library: nothing is downloaded.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string
	Content string
}

type values struct {
	System   string
	Messages []message
	Prompt   string
	Response string
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: render TEMPLATE_FILE CASES_JSON")
		os.Exit(2)
	}
	text, err := os.ReadFile(os.Args[1])
	check(err)
	tmpl, err := template.New("TEMPLATE").Option("missingkey=error").Parse(string(text))
	check(err)
	raw, err := os.ReadFile(os.Args[2])
	check(err)
	var cases []values
	check(json.Unmarshal(raw, &cases))
	out := make([]string, 0, len(cases))
	for _, c := range cases {
		var b strings.Builder
		check(tmpl.Execute(&b, c))
		out = append(out, b.String())
	}
	check(json.NewEncoder(os.Stdout).Encode(out))
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
