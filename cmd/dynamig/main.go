// Command dynamig plans and replays MIG scenarios: see "dynamig help".
package main

import (
	"os"

	"github.com/dynamig/dynamig/pkg/cli"
)

func main() { os.Exit(cli.Run(os.Args[1:], os.Stdout, os.Stderr)) }
