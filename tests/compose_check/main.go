// compose_check loads docker-compose.yml the way Docker Compose v2 does (compose-go: the
// compose-spec JSON schema, variable interpolation with an env file, merges of YAML anchors) and
// prints the resolved project as JSON, so the Python tests can check what Docker would run.
//
//	go run . COMPOSE_FILE ENV_FILE
//
// It exits 1 with compose-go's message when the file breaks the schema or a required variable
// has no value.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: compose_check COMPOSE_FILE ENV_FILE")
		os.Exit(2)
	}
	options, err := cli.NewProjectOptions(
		[]string{os.Args[1]},
		cli.WithEnvFiles(os.Args[2]),
		cli.WithDotEnv,
		cli.WithName("freshrec"),
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, err := project.MarshalJSON()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Stdout.Write(out)
}
